// One matrix worker with node-postgres: named (server-side prepared) queries, a transaction,
// an error and its ROLLBACK. Prints the results as JSON. Args: worker table (env PG*).
const { Client } = require("pg");

async function main() {
  const [worker, table] = [Number(process.argv[2]), process.argv[3]];
  const base = worker * 1000;
  const out = [];
  const c = new Client();
  await c.connect();
  await c.query("BEGIN");
  for (let i = 0; i < 20; i++) {
    await c.query({
      name: "ins",
      text: `insert into ${table} (id, v, n) values ($1, $2, $3)`,
      values: [base + i, `w${worker}-${i}`, (i * 1.5).toString()],
    });
  }
  await c.query("COMMIT");
  for (let i = 0; i < 20; i += 3) {
    const r = await c.query({
      name: "one",
      text: `select id, v, n::text from ${table} where id = $1`,
      values: [base + i],
      rowMode: "array",
    });
    out.push(r.rows[0]);
  }
  await c.query("BEGIN");
  try {
    await c.query({ name: "div", text: "select 1/$1::int", values: [0] });
  } catch (e) {
    out.push(["error", e.code]);
  }
  await c.query("ROLLBACK");
  const agg = `select count(*)::int, sum(n)::text from ${table} where id >= $1 and id < $2`;
  let r = await c.query({ name: "agg", text: agg, values: [base, base + 1000], rowMode: "array" });
  out.push(r.rows[0]);
  r = await c.query({ name: "upd", text: `update ${table} set v = v || '!' where id = $1`, values: [base + 1] });
  out.push(["updated", r.rowCount]);
  const all = `select string_agg(v, ',' order by id) from ${table} where id >= $1 and id < $2`;
  r = await c.query({ name: "all", text: all, values: [base, base + 1000], rowMode: "array" });
  out.push(r.rows[0]);
  await c.end();
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
