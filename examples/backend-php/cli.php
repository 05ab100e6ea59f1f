<?php
/**
 * The calls of Switchboard.php from a shell: one call, its answer printed as
 * one line of JSON.
 *
 *     php cli.php [--api URL] [--api-key KEY] CALL ARGS...
 *
 * --api and --api-key default to $SWITCHBOARD_API and $SWITCHBOARD_API_KEY.
 * Lists (uids, client ids) are comma-separated. Exits 1 with the error on
 * stderr when the API refuses the call or cannot be reached, 2 on bad usage.
 */

require __DIR__ . '/Switchboard.php';

const USAGE = <<<'TXT'
usage: php cli.php [--api URL] [--api-key KEY] CALL ARGS...
  distribute-ws style:
    send UID DATA                   sendMulti UID,UID,... DATA      sendAll DATA
  GatewayWorker style:
    sendToUid UID[,UID...] DATA     sendToGroup GROUP[,GROUP...] DATA [EXCLUDE_CLIENT_ID,...]
    sendToAll DATA                  sendToClient CLIENT_ID DATA
    isUidOnline UID                 getClientIdByUid UID            getUidByClientId CLIENT_ID
    getClientIdCountByGroup GROUP   getClientIdListByGroup GROUP    getAllClientIdCount
    bindUid CLIENT_ID UID           unbindUid CLIENT_ID
    joinGroup CLIENT_ID GROUP       leaveGroup CLIENT_ID GROUP      closeClient CLIENT_ID [DATA]

TXT;

function usage(string $why): void
{
    fwrite(STDERR, "$why\n" . USAGE);
    exit(2);
}

function csv(string $list): array
{
    return array_values(array_filter(explode(',', $list), 'strlen'));
}

$args = array_slice($argv, 1);
$api = getenv('SWITCHBOARD_API') ?: 'http://127.0.0.1:8000';
$key = getenv('SWITCHBOARD_API_KEY') ?: null;
while ($args && substr($args[0], 0, 2) === '--') {
    $flag = array_shift($args);
    if ($flag === '--help') {
        fwrite(STDOUT, USAGE);
        exit(0);
    }
    if (!$args) {
        usage("$flag needs a value");
    }
    $value = array_shift($args);
    if ($flag === '--api') {
        $api = $value;
    } elseif ($flag === '--api-key') {
        $key = $value;
    } else {
        usage("unknown option $flag");
    }
}
if (!$args) {
    usage('no call given');
}
$call = array_shift($args);

Gateway::$api = $api;
Gateway::$apiKey = $key;
$sb = new Switchboard($api, $key);

// Each call: how many arguments it takes at least and at most, and what runs.
$calls = [
    'send' => [2, 2, function ($uid, $data) use ($sb) { return $sb->send($uid, $data); }],
    'sendMulti' => [2, 2, function ($uids, $data) use ($sb) { return $sb->sendMulti(csv($uids), $data); }],
    'sendAll' => [1, 1, function ($data) use ($sb) { return $sb->sendAll($data); }],
    'sendToUid' => [2, 2, function ($uids, $data) { return Gateway::sendToUid(csv($uids), $data); }],
    'sendToGroup' => [2, 3, function ($groups, $data, $exclude = null) {
        return Gateway::sendToGroup(csv($groups), $data, $exclude === null ? null : csv($exclude));
    }],
    'sendToAll' => [1, 1, function ($data) { return Gateway::sendToAll($data); }],
    'sendToClient' => [2, 2, function ($id, $data) { return Gateway::sendToClient($id, $data); }],
    'isUidOnline' => [1, 1, function ($uid) { return Gateway::isUidOnline($uid); }],
    'getClientIdByUid' => [1, 1, function ($uid) { return Gateway::getClientIdByUid($uid); }],
    'getUidByClientId' => [1, 1, function ($id) { return Gateway::getUidByClientId($id); }],
    'getClientIdCountByGroup' => [1, 1, function ($g) { return Gateway::getClientIdCountByGroup($g); }],
    'getClientIdListByGroup' => [1, 1, function ($g) { return Gateway::getClientIdListByGroup($g); }],
    'getAllClientIdCount' => [0, 0, function () { return Gateway::getAllClientIdCount(); }],
    'bindUid' => [2, 2, function ($id, $uid) { Gateway::bindUid($id, $uid); return true; }],
    'unbindUid' => [1, 1, function ($id) { Gateway::unbindUid($id); return true; }],
    'joinGroup' => [2, 2, function ($id, $g) { Gateway::joinGroup($id, $g); return true; }],
    'leaveGroup' => [2, 2, function ($id, $g) { Gateway::leaveGroup($id, $g); return true; }],
    'closeClient' => [1, 2, function ($id, $data = null) { Gateway::closeClient($id, $data); return true; }],
];

if (!isset($calls[$call])) {
    usage("unknown call $call");
}
[$min, $max, $run] = $calls[$call];
if (count($args) < $min || count($args) > $max) {
    usage("$call takes " . ($min === $max ? $min : "$min to $max") . ' arguments');
}
try {
    echo json_encode($run(...$args)), "\n";
} catch (SwitchboardException $e) {
    fwrite(STDERR, 'error: ' . $e->getMessage() . "\n");
    exit(1);
}
