# One matrix worker with Ruby pg: prepare/exec_prepared, a transaction, an error and
# its rollback. Prints JSON. Args: conninfo worker table
require "pg"
require "json"

conninfo, worker, table = ARGV
worker = worker.to_i
base = worker * 1000
out = []
c = PG.connect(conninfo)
c.prepare("ins", "insert into #{table} (id, v, n) values ($1, $2, $3)")
c.transaction do
  20.times { |i| c.exec_prepared("ins", [base + i, "w#{worker}-#{i}", (i * 1.5).to_s]) }
end
c.prepare("one", "select id, v, n::text from #{table} where id = $1")
(0...20).step(3) { |i| out << c.exec_prepared("one", [base + i]).values[0] }
c.prepare("div", "select 1/$1::int")
c.exec("BEGIN")
begin
  c.exec_prepared("div", [0])
rescue PG::Error => e
  out << ["error", e.result.error_field(PG::Result::PG_DIAG_SQLSTATE)]
end
c.exec("ROLLBACK")
c.prepare("agg", "select count(*)::int, sum(n)::text from #{table} where id >= $1 and id < $2")
out << c.exec_prepared("agg", [base, base + 1000]).values[0]
c.prepare("upd", "update #{table} set v = v || '!' where id = $1")
out << ["updated", c.exec_prepared("upd", [base + 1]).cmd_tuples]
c.prepare("all", "select string_agg(v, ',' order by id) from #{table} where id >= $1 and id < $2")
out << c.exec_prepared("all", [base, base + 1000]).values[0]
c.close
puts JSON.generate(out)
