<?php
/**
 * Pushing to switchboard from PHP, through its server API, with the calls of
 * the systems it replaces: distribute-ws style `send`, `sendMulti`, `sendAll`
 * on a `Switchboard` object, and a GatewayWorker style static `Gateway`
 * (`Gateway::sendToUid`, `Gateway::sendToGroup`, `Gateway::isUidOnline`, ...)
 * whose `$registerAddress` becomes `Gateway::$api` and `Gateway::$apiKey`.
 *
 * Needs php-cli with the curl extension; nothing else.
 *
 *     require 'Switchboard.php';
 *     $sb = new Switchboard('http://127.0.0.1:8000', getenv('SWITCHBOARD_API_KEY'));
 *     $sb->send('alice', 'hello');
 *
 *     Gateway::$api = 'http://127.0.0.1:8000';
 *     Gateway::$apiKey = getenv('SWITCHBOARD_API_KEY');
 *     Gateway::sendToGroup('lobby', json_encode(['text' => 'hi']));
 */

/** The API answered with an error, or could not be reached. */
class SwitchboardException extends RuntimeException
{
    /** @var string the API's error code (`not_found`, `unauthorized`, ...), or `unreachable` */
    public $errorCode;
    /** @var int the HTTP status, 0 when there was no answer */
    public $status;

    public function __construct(string $errorCode, string $message, int $status)
    {
        parent::__construct("$errorCode: $message" . ($status ? " (HTTP $status)" : ''));
        $this->errorCode = $errorCode;
        $this->status = $status;
    }
}

/** A client of switchboard's server API: `POST /api/<method>`, JSON both ways. */
class Switchboard
{
    /** @var bool whether the last query's answer had every node's part */
    public $lastComplete = true;
    /** @var string[] the nodes that did not answer the last query */
    public $lastMissing = [];

    private $api;
    private $key;
    private $timeout;

    /**
     * @param string      $api     the node's API, e.g. http://127.0.0.1:8000
     * @param string|null $key     its --api-key
     * @param float       $timeout seconds for one call
     */
    public function __construct(string $api, ?string $key = null, float $timeout = 5.0)
    {
        $this->api = rtrim(strpos($api, '://') === false ? "http://$api" : $api, '/');
        $this->key = $key ?: null;
        $this->timeout = $timeout;
    }

    /**
     * Calls any API method; returns its `result`.
     *
     * @throws SwitchboardException
     */
    public function call(string $method, array $params = [])
    {
        $headers = ['Content-Type: application/json'];
        if ($this->key !== null) {
            $headers[] = "Authorization: apikey {$this->key}";
        }
        $ch = curl_init("{$this->api}/api/$method");
        curl_setopt_array($ch, [
            CURLOPT_POST => true,
            // An empty array must go out as an object: the API takes `{}`.
            CURLOPT_POSTFIELDS => $params ? json_encode($params) : '{}',
            CURLOPT_HTTPHEADER => $headers,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_TIMEOUT_MS => (int)($this->timeout * 1000),
            CURLOPT_CONNECTTIMEOUT_MS => (int)(min($this->timeout, 2.0) * 1000),
        ]);
        $body = curl_exec($ch);
        $status = (int)curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        $curlError = curl_error($ch);
        curl_close($ch);
        if ($body === false) {
            throw new SwitchboardException('unreachable', "{$this->api}: $curlError", 0);
        }
        $reply = json_decode($body, true);
        if ($status !== 200 || !is_array($reply) || !array_key_exists('result', $reply)) {
            $error = is_array($reply) && isset($reply['error']) ? $reply['error'] : [];
            throw new SwitchboardException(
                $error['code'] ?? 'http',
                $error['message'] ?? substr((string)$body, 0, 200),
                $status
            );
        }
        $this->lastComplete = $reply['complete'] ?? true;
        $this->lastMissing = $reply['missing'] ?? [];
        return $reply['result'];
    }

    /**
     * Pushes `$data` to a target (`users`, `groups`, `conns`, `all`,
     * `except_users`, `except_conns`). Text goes as a text frame; a string
     * that is not UTF-8 goes as one binary frame; an array is sent as JSON.
     * Returns the report: `local`, `local_dropped`, `remote_sent`, `remote_dropped`.
     */
    public function push(array $target, $data): array
    {
        if (is_array($data)) {
            $data = json_encode($data);
        }
        $data = (string)$data;
        $params = $target;
        if (preg_match('//u', $data)) {
            $params['data'] = $data;
        } else {
            $params['data'] = base64_encode($data);
            $params['binary'] = true;
        }
        return $this->call('push', $params);
    }

    // distribute-ws style.

    /** Sends to every connection of one user, on any node. */
    public function send(string $uid, $data): array
    {
        return $this->push(['users' => [$uid]], $data);
    }

    /** Sends to every connection of several users; a connection gets it once. */
    public function sendMulti(array $uids, $data): array
    {
        return $this->push(['users' => array_values(array_map('strval', $uids))], $data);
    }

    /** Sends to every connection of the cluster. */
    public function sendAll($data): array
    {
        return $this->push(['all' => true], $data);
    }

    // Queries, cluster-wide.

    public function online(string $uid): bool
    {
        return $this->call('online', ['uid' => $uid])['online'];
    }

    /** @return string[] connection ids */
    public function userConns(string $uid): array
    {
        return $this->call('user_conns', ['uid' => $uid])['conns'];
    }

    public function groupCount(string $group): int
    {
        return $this->call('group_count', ['group' => $group])['count'];
    }
}

/**
 * GatewayWorker's `GatewayWorker\Lib\Gateway` calls, on switchboard's API.
 * Client ids are switchboard's connection ids (20 hex digits, as
 * GatewayWorker's). Set `Gateway::$api` (and `Gateway::$apiKey`) where
 * `Gateway::$registerAddress` was set.
 */
class Gateway
{
    /** @var string the node's API, e.g. http://127.0.0.1:8000 */
    public static $api = 'http://127.0.0.1:8000';
    /** @var string|null the node's --api-key */
    public static $apiKey = null;

    private static $client;
    /** @var array the $api and $apiKey that $client was made for */
    private static $clientFor;

    /** The client for the current `$api` and `$apiKey`. */
    public static function client(): Switchboard
    {
        if (self::$client === null || self::$clientFor !== [self::$api, self::$apiKey]) {
            self::$client = new Switchboard(self::$api, self::$apiKey);
            self::$clientFor = [self::$api, self::$apiKey];
        }
        return self::$client;
    }

    private static function ids($idOrIds): array
    {
        return array_values(array_map('strval', (array)$idOrIds));
    }

    /** @param string|string[] $uid */
    public static function sendToUid($uid, $message)
    {
        return self::client()->push(['users' => self::ids($uid)], $message);
    }

    /**
     * @param string|string[]      $group
     * @param string|string[]|null $excludeClientId
     */
    public static function sendToGroup($group, $message, $excludeClientId = null)
    {
        $target = ['groups' => self::ids($group)];
        if ($excludeClientId !== null) {
            $target['except_conns'] = self::ids($excludeClientId);
        }
        return self::client()->push($target, $message);
    }

    /**
     * @param string[]|null        $clientIdArray only these connections, when given
     * @param string|string[]|null $excludeClientId
     */
    public static function sendToAll($message, $clientIdArray = null, $excludeClientId = null)
    {
        $target = $clientIdArray === null ? ['all' => true] : ['conns' => self::ids($clientIdArray)];
        if ($excludeClientId !== null) {
            $target['except_conns'] = self::ids($excludeClientId);
        }
        return self::client()->push($target, $message);
    }

    public static function sendToClient(string $clientId, $message)
    {
        return self::client()->push(['conns' => [$clientId]], $message);
    }

    /** 1 when the user has a connection on any node, else 0 (as GatewayWorker). */
    public static function isUidOnline($uid): int
    {
        return self::client()->online((string)$uid) ? 1 : 0;
    }

    /** @return string[] */
    public static function getClientIdByUid($uid): array
    {
        return self::client()->userConns((string)$uid);
    }

    /** The uid a connection is bound to, or null. */
    public static function getUidByClientId(string $clientId)
    {
        return self::client()->call('conn_user', ['conn' => $clientId])['uid'];
    }

    public static function getClientIdCountByGroup(string $group): int
    {
        return self::client()->groupCount($group);
    }

    /** @return string[] */
    public static function getClientIdListByGroup(string $group): array
    {
        return self::client()->call('group_members', ['group' => $group])['conns'];
    }

    public static function getAllClientIdCount(): int
    {
        return self::client()->call('totals')['conns'];
    }

    public static function bindUid(string $clientId, $uid): void
    {
        self::client()->call('bind', ['conn' => $clientId, 'uid' => (string)$uid]);
    }

    public static function unbindUid(string $clientId, $uid = null): void
    {
        self::client()->call('unbind', ['conn' => $clientId]);
    }

    public static function joinGroup(string $clientId, string $group): void
    {
        self::client()->call('join', ['conn' => $clientId, 'group' => $group]);
    }

    public static function leaveGroup(string $clientId, string $group): void
    {
        self::client()->call('leave', ['conn' => $clientId, 'group' => $group]);
    }

    /** Closes a connection; `$message` is sent to it first when given. */
    public static function closeClient(string $clientId, $message = null): void
    {
        if ($message !== null) {
            self::sendToClient($clientId, $message);
        }
        self::client()->call('close', ['conns' => [$clientId]]);
    }
}
