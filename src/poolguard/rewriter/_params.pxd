# Types for the compiled build of _params.py (see _compiled.py); the .py is the only source.
from ._pool cimport Backend
from ._replies cimport Exchange

cpdef apply_settings(Backend backend, dict wanted, dict server_params, Exchange ex)
