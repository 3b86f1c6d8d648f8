// One matrix worker with pgJDBC: server-side prepared statements from the first use
// (prepareThreshold=1), a batch, autocommit off and on, an error then rollback() (pgJDBC
// sends a named Parse of ROLLBACK inside the failed transaction). Prints JSON.
// Args: jdbc-url user password worker table
import java.sql.*;
import java.util.*;

public class Workload {
    public static void main(String[] a) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", a[1]);
        props.setProperty("password", a[2]);
        props.setProperty("prepareThreshold", "1");
        int worker = Integer.parseInt(a[3]);
        String table = a[4];
        int base = worker * 1000;
        List<String> out = new ArrayList<>();
        try (Connection c = DriverManager.getConnection(a[0], props)) {
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement(
                    "insert into " + table + " (id, v, n) values (?, ?, ?::numeric)")) {
                for (int i = 0; i < 20; i++) {
                    ins.setInt(1, base + i);
                    ins.setString(2, "w" + worker + "-" + i);
                    ins.setString(3, Double.toString(i * 1.5));
                    ins.addBatch();
                }
                ins.executeBatch();
            }
            c.commit();
            try (PreparedStatement one = c.prepareStatement(
                    "select id, v, n::text from " + table + " where id = ?")) {
                for (int i = 0; i < 20; i += 3) {
                    one.setInt(1, base + i);
                    try (ResultSet rs = one.executeQuery()) {
                        rs.next();
                        out.add(row(rs.getInt(1), rs.getString(2), rs.getString(3)));
                    }
                }
            }
            c.commit();
            for (int round = 0; round < 3; round++) {
                try (PreparedStatement div = c.prepareStatement("select 1/?::int")) {
                    div.setInt(1, 0);
                    div.executeQuery();
                } catch (SQLException e) {
                    out.add(row("error", e.getSQLState()));
                }
                c.rollback();
            }
            c.setAutoCommit(true);
            try (PreparedStatement agg = c.prepareStatement(
                    "select count(*)::int, sum(n)::text from " + table + " where id >= ? and id < ?")) {
                agg.setInt(1, base);
                agg.setInt(2, base + 1000);
                agg.setFetchSize(1);
                try (ResultSet rs = agg.executeQuery()) {
                    rs.next();
                    out.add(row(rs.getInt(1), rs.getString(2)));
                }
            }
            try (PreparedStatement upd = c.prepareStatement(
                    "update " + table + " set v = v || '!' where id = ?")) {
                upd.setInt(1, base + 1);
                out.add(row("updated", upd.executeUpdate()));
            }
            try (PreparedStatement all = c.prepareStatement(
                    "select string_agg(v, ',' order by id) from " + table + " where id >= ? and id < ?")) {
                all.setInt(1, base);
                all.setInt(2, base + 1000);
                try (ResultSet rs = all.executeQuery()) {
                    rs.next();
                    out.add(row(rs.getString(1)));
                }
            }
        }
        System.out.println("[" + String.join(",", out) + "]");
    }

    static String row(Object... values) {
        List<String> parts = new ArrayList<>();
        for (Object v : values) {
            if (v instanceof Number) parts.add(v.toString());
            else parts.add("\"" + v.toString().replace("\\", "\\\\").replace("\"", "\\\"") + "\"");
        }
        return "[" + String.join(",", parts) + "]";
    }
}
