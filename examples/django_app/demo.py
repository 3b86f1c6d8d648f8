"""Run the example against a throwaway PostgreSQL: ``python demo.py [--asgi]``, Ctrl-C to stop.

Starts a private PostgreSQL with poolguard.testing (system binaries, or
``pip install 'poolguard[embedded]'``), migrates, adds three products and serves on
http://127.0.0.1:8000 with runserver (or uvicorn with ``--asgi``).  With your own database,
skip this file: ``DATABASE_URL=postgresql://... python manage.py migrate && ... runserver``.
"""

import os
import subprocess
import sys
from pathlib import Path

from poolguard.testing import start_postgres

HERE = Path(__file__).resolve().parent


def main() -> None:
    server = start_postgres(max_connections=20)
    env = {**os.environ, "DATABASE_URL": server.url, "DJANGO_SETTINGS_MODULE": "shop.settings"}
    manage = [sys.executable, str(HERE / "manage.py")]
    try:
        subprocess.run([*manage, "migrate", "-v", "0"], env=env, check=True)
        seed = (
            "from shop.models import Product; Product.objects.bulk_create("
            "Product(name=n, stock=10) for n in ('apple', 'pear', 'plum'))"
        )
        subprocess.run([*manage, "shell", "-c", seed], env=env, check=True)
        if "--asgi" in sys.argv:
            serve = [sys.executable, "-m", "uvicorn", "shop.asgi:application", "--port", "8000"]
        else:
            serve = [*manage, "runserver", "127.0.0.1:8000"]
        print("serving on http://127.0.0.1:8000  (/, /async/, /buy/1/, /slow/)  Ctrl-C stops")
        subprocess.run(serve, env=env, cwd=HERE, check=False)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
