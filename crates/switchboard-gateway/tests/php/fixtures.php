<?php
// Writes fixtures.json: what PHP itself answers for the functions the codec
// reimplements, so tests can compare without PHP installed.
// Regenerate with PHP 8 CLI: php tests/php/fixtures.php > tests/php/fixtures.json
mt_srand(20260101);

function u64() {
    return (mt_rand(0, 0xffff) << 48) | (mt_rand(0, 0xffff) << 32) | (mt_rand(0, 0xffff) << 16) | mt_rand(0, 0xffff);
}

$doubles = [0.1, 0.2, 0.3, 1/3, 2/3, 1e15, 1e16, 1e17, 1e21, 1e22, 1e-4, 1e-5, 123456789.123456789,
    9007199254740993, 4.35, 0.000123, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.5, 100.0, 0.5];
for ($e = -30; $e <= 30; $e++) {
    $doubles[] = pow(10, $e);
    $doubles[] = 1.5 * pow(10, $e);
    $doubles[] = -7.25 * pow(10, $e);
}
while (count($doubles) < 2000) {
    $d = unpack('E', pack('J', u64()))[1];
    if (is_finite($d)) {
        $doubles[] = $d;
    }
    $doubles[] = mt_rand() / mt_rand(1, 1000000) * (mt_rand(0, 1) ? 1 : -1);
}
$floats = [];
foreach ($doubles as $d) {
    $d = (float) $d;
    $floats[] = [bin2hex(pack('E', $d)), serialize($d), json_encode($d), (string) $d];
}

$strings = ["", "a/b", "é", "😀", "\x01\t\"\\", "\x7f", "\u{2028}\u{ffff}\u{10000}\u{10ffff}", "<>&'", "\x00\x1f", "日本語", "\r\n\x08\x0c"];
$json_strings = [];
foreach ($strings as $s) {
    $json_strings[] = [bin2hex($s), json_encode($s)];
}

$queries = ["uid=alice&group=g1", "a[]=1&a[]=2&a[x]=3", "a[-5]=x&a[]=y", "a[b=1", "a[b][c=1", "a.b c=1",
    " a=1", "a=1&a[x]=2", "a[x]=1&a=2", "a%00b=1", "a=%00b", "=x", "a&b=&=c&&", "a[b]c=1", "a[b]][c]=1",
    "a[[b]]=1", "x=1+2%2B3%zz%4%", "5=a&05=b&-0=c&9223372036854775808=d", "a[.]=1", "..=1", "[a]=1", "a]=1",
    "a[ b ]=1&a[ b ]=2", "a[0]=x&a[]=y&a[1]=z", "%61%5Bb%5D=1", "a[%5B]=1", "a[b]=1&a[b][c]=2",
    "a=1&a" . str_repeat("[x]", 65) . "=1&b=2", "q" . str_repeat("[]", 64) . "=deep"];
$parse_str = [];
foreach ($queries as $q) {
    parse_str($q, $r);
    $parse_str[] = [$q, serialize($r)];
}

$inputs = ["i:-99999999999999999999;", "i:9223372036854775808;", "i:-0;", "i:+5;", "i:0001;", "d:1.e5;",
    "d:.5e-3;", "d:1e+5;", "d:0001.5;", "d:+1;", "d:-INF;", "d:1e400;", "d:-1e-400;", "s:02:\"ab\";",
    "a:01:{i:0;N;}", "S:2:\"\\61b\";", "S:3:\"\\4A\\4bc\";", "a:1:{s:2:\"-5\";N;}", "a:1:{s:2:\"05\";N;}",
    "a:1:{s:2:\"-0\";N;}", "a:2:{i:1;i:1;i:1;i:2;}", "a:2:{s:1:\"1\";i:1;i:1;i:2;}", "b:1;", "b:0;", "N;",
    "i:;", "d:;", "d:1.5e;", "d:-NAN;", "d:+INF;", "d:.e5;", "d:0x1A;", "d: 1;", "i: 1;", "b:01;", "b:2;",
    "s:3:\"ab\";", "s:2:\"ab\"", "a:1:{d:1.5;N;}", "a:1:{b:1;N;}", "a:1:{N;N;}", "a:2:{i:0;N;}",
    "s:+2:\"ab\";", "a:+1:{i:0;N;}", "d:1_0;", "a:1:{i:0;a:0:{}}", "a:0:{}}", "i:1;junk", "",
    "d:123456789012345678901234567890;", "d:0.1000000000000000055511151231257827;", "i:-9223372036854775808;"];
$unserialize = [];
foreach ($inputs as $in) {
    $v = @unserialize($in, ['allowed_classes' => false]);
    $unserialize[] = [$in, ($v === false && $in !== 'b:0;') ? null : serialize($v)];
}

$merges = [
    [['uid' => 'alice', 'tags' => ['a', 'b'], 'n' => 1], ['tags' => [1 => 'B'], 'n' => [1], 'x' => null]],
    [['a' => ['b' => ['c' => 1, 'd' => 2]]], ['a' => ['b' => ['c' => 3], 'e' => 4]]],
    [[1, 2, 3], [5 => 6, 0 => 'z']],
    [['a' => 1], ['a' => ['x']]],
    [['a' => ['x']], ['a' => 1]],
    [[], ['k' => 'v']],
];
$replace = [];
foreach ($merges as [$base, $new]) {
    $replace[] = [serialize($base), serialize($new), serialize(array_replace_recursive($base, $new))];
}

// Not "-0": PHP reads it as the integer 0, the codec as the float -0.0.
$jsons = ['{"2":"b","0":"a","x":{"5":1},"2":"c"}', '[1,"x",null,true,1.5,-0.0,1e2,18446744073709551615]',
    '{"":1,"-5":2,"05":3,"-0":4}', '{"a":{"b":[]}}', '"\u00e9\ud83d\ude00"', '12345678901234567890', '1.0',
    '{"exclude":{"1":1,"3":3}}', '[]', '{}', '{"a":1,"a":{"b":2}}'];
$json_decode = [];
foreach ($jsons as $j) {
    $v = json_decode($j, true);
    $json_decode[] = [$j, serialize($v), json_encode($v)];
}

echo json_encode([
    'php' => PHP_VERSION,
    'floats' => $floats,
    'json_strings' => $json_strings,
    'parse_str' => $parse_str,
    'unserialize' => $unserialize,
    'array_replace_recursive' => $replace,
    'json_decode' => $json_decode,
], JSON_UNESCAPED_SLASHES), "\n";
