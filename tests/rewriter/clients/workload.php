<?php
// One matrix worker with PHP PDO, emulated prepares off (server-side prepared statements).
// Prints JSON. Args: dsn user password worker table
[$_, $dsn, $user, $password, $worker, $table] = $argv;
$worker = (int) $worker;
$base = $worker * 1000;
$out = [];
$pdo = new PDO($dsn, $user, $password, [
    PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
    PDO::ATTR_EMULATE_PREPARES => false,
]);
$pdo->beginTransaction();
$ins = $pdo->prepare("insert into $table (id, v, n) values (?, ?, ?::numeric)");
for ($i = 0; $i < 20; $i++) {
    $ins->execute([$base + $i, "w$worker-$i", (string) ($i * 1.5)]);
}
$pdo->commit();
$one = $pdo->prepare("select id, v, n::text from $table where id = ?");
for ($i = 0; $i < 20; $i += 3) {
    $one->execute([$base + $i]);
    $out[] = $one->fetch(PDO::FETCH_NUM);
}
$pdo->beginTransaction();
try {
    $div = $pdo->prepare("select 1/?::int");
    $div->execute([0]);
} catch (PDOException $e) {
    $out[] = ["error", $e->getCode()];
}
$pdo->rollBack();
$agg = $pdo->prepare("select count(*)::int, sum(n)::text from $table where id >= ? and id < ?");
$agg->execute([$base, $base + 1000]);
$out[] = $agg->fetch(PDO::FETCH_NUM);
$upd = $pdo->prepare("update $table set v = v || '!' where id = ?");
$upd->execute([$base + 1]);
$out[] = ["updated", $upd->rowCount()];
$all = $pdo->prepare("select string_agg(v, ',' order by id) from $table where id >= ? and id < ?");
$all->execute([$base, $base + 1000]);
$out[] = $all->fetch(PDO::FETCH_NUM);
echo json_encode($out), "\n";
