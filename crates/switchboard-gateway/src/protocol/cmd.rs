//! Command codes of GatewayProtocol frames (docs/GATEWAY-PROTOCOL.md §3.3) and the header flag bits (§3.2).
//!
//! The values are those of `GatewayWorker\Protocols\GatewayProtocol`; every one
//! of them was seen on the wire in the recorded vectors. Codes 2 and 17-19 are
//! unused.

/// Gateway → worker: a client connected (before any WebSocket handshake).
pub const ON_CONNECT: u8 = 1;
/// Gateway → worker: a client sent a message; the body is the message.
pub const ON_MESSAGE: u8 = 3;
/// Gateway → worker: a client connection closed.
pub const ON_CLOSE: u8 = 4;
/// Worker → gateway: send the body to one connection.
pub const SEND_TO_ONE: u8 = 5;
/// Worker → gateway: send the body to every connection, a listed subset, or all but some.
pub const SEND_TO_ALL: u8 = 6;
/// Worker → gateway: send the body (unless it is a serialized null), then close.
pub const KICK: u8 = 7;
/// Worker → gateway: close a connection at once, dropping pending output.
pub const DESTROY: u8 = 8;
/// Worker → gateway: merge `ext_data` into the stored session.
pub const UPDATE_SESSION: u8 = 9;
/// Query: every connection's session string.
pub const GET_ALL_CLIENT_SESSIONS: u8 = 10;
/// Query: whether a connection exists (`0` or `1`).
pub const IS_ONLINE: u8 = 11;
/// Worker → gateway: bind a connection to the uid in `ext_data`.
pub const BIND_UID: u8 = 12;
/// Worker → gateway: unbind a connection from its uid.
pub const UNBIND_UID: u8 = 13;
/// Worker → gateway: send the body to every connection of the uids in `ext_data`.
pub const SEND_TO_UID: u8 = 14;
/// Query: connection ids bound to the uid in `ext_data`.
pub const GET_CLIENT_ID_BY_UID: u8 = 15;
/// Query: connection ids of each uid of a JSON list.
pub const BATCH_GET_CLIENT_ID_BY_UID: u8 = 16;
/// Worker → gateway: add a connection to the group in `ext_data`.
pub const JOIN_GROUP: u8 = 20;
/// Worker → gateway: remove a connection from the group in `ext_data`.
pub const LEAVE_GROUP: u8 = 21;
/// Worker → gateway: send the body to the members of some groups.
pub const SEND_TO_GROUP: u8 = 22;
/// Query: the session string of each member of a group.
pub const GET_CLIENT_SESSIONS_BY_GROUP: u8 = 23;
/// Query: the member count of a group, or of the gateway with empty `ext_data`.
pub const GET_CLIENT_COUNT_BY_GROUP: u8 = 24;
/// Query: fields of the connections matching conditions.
pub const SELECT: u8 = 25;
/// Query: the ids of the groups that have members.
pub const GET_GROUP_ID_LIST: u8 = 26;
/// Worker → gateway: dissolve a group.
pub const UNGROUP: u8 = 27;
/// Query: the member count of each group of a JSON list.
pub const BATCH_GET_CLIENT_COUNT_BY_GROUP: u8 = 28;
/// Worker → gateway: first frame of a worker link, authorizing it.
pub const WORKER_CONNECT: u8 = 200;
/// Gateway → worker: keep-alive, ignored by the worker.
pub const PING: u8 = 201;
/// Pusher → gateway: authorizes a non-worker inner connection.
pub const GATEWAY_CLIENT_CONNECT: u8 = 202;
/// Query: one connection's stored session.
pub const GET_SESSION_BY_CLIENT_ID: u8 = 203;
/// Worker → gateway: replace the stored session with `ext_data`.
pub const SET_SESSION: u8 = 204;
/// Gateway → worker: a WebSocket handshake completed; the body is a serialized array.
pub const ON_WEBSOCKET_CONNECT: u8 = 205;

/// Flag bit: the body is a PHP scalar's string form, not `serialize()` output.
pub const FLAG_BODY_IS_SCALAR: u8 = 0x01;
/// Flag bit: the gateway writes the body to the client without its protocol's encoder.
pub const FLAG_NOT_CALL_ENCODE: u8 = 0x02;

/// The PHP constant name of a command (`"CMD_SEND_TO_ONE"`), or `"CMD_UNKNOWN"`.
pub fn name(cmd: u8) -> &'static str {
    match cmd {
        ON_CONNECT => "CMD_ON_CONNECT",
        ON_MESSAGE => "CMD_ON_MESSAGE",
        ON_CLOSE => "CMD_ON_CLOSE",
        SEND_TO_ONE => "CMD_SEND_TO_ONE",
        SEND_TO_ALL => "CMD_SEND_TO_ALL",
        KICK => "CMD_KICK",
        DESTROY => "CMD_DESTROY",
        UPDATE_SESSION => "CMD_UPDATE_SESSION",
        GET_ALL_CLIENT_SESSIONS => "CMD_GET_ALL_CLIENT_SESSIONS",
        IS_ONLINE => "CMD_IS_ONLINE",
        BIND_UID => "CMD_BIND_UID",
        UNBIND_UID => "CMD_UNBIND_UID",
        SEND_TO_UID => "CMD_SEND_TO_UID",
        GET_CLIENT_ID_BY_UID => "CMD_GET_CLIENT_ID_BY_UID",
        BATCH_GET_CLIENT_ID_BY_UID => "CMD_BATCH_GET_CLIENT_ID_BY_UID",
        JOIN_GROUP => "CMD_JOIN_GROUP",
        LEAVE_GROUP => "CMD_LEAVE_GROUP",
        SEND_TO_GROUP => "CMD_SEND_TO_GROUP",
        GET_CLIENT_SESSIONS_BY_GROUP => "CMD_GET_CLIENT_SESSIONS_BY_GROUP",
        GET_CLIENT_COUNT_BY_GROUP => "CMD_GET_CLIENT_COUNT_BY_GROUP",
        SELECT => "CMD_SELECT",
        GET_GROUP_ID_LIST => "CMD_GET_GROUP_ID_LIST",
        UNGROUP => "CMD_UNGROUP",
        BATCH_GET_CLIENT_COUNT_BY_GROUP => "CMD_BATCH_GET_CLIENT_COUNT_BY_GROUP",
        WORKER_CONNECT => "CMD_WORKER_CONNECT",
        PING => "CMD_PING",
        GATEWAY_CLIENT_CONNECT => "CMD_GATEWAY_CLIENT_CONNECT",
        GET_SESSION_BY_CLIENT_ID => "CMD_GET_SESSION_BY_CLIENT_ID",
        SET_SESSION => "CMD_SET_SESSION",
        ON_WEBSOCKET_CONNECT => "CMD_ON_WEBSOCKET_CONNECT",
        _ => "CMD_UNKNOWN",
    }
}

/// Whether a gateway answers the command with a length-prefixed reply (docs/GATEWAY-PROTOCOL.md §4.2).
pub fn expects_reply(cmd: u8) -> bool {
    matches!(
        cmd,
        GET_ALL_CLIENT_SESSIONS
            | IS_ONLINE
            | GET_CLIENT_ID_BY_UID
            | BATCH_GET_CLIENT_ID_BY_UID
            | GET_CLIENT_SESSIONS_BY_GROUP
            | GET_CLIENT_COUNT_BY_GROUP
            | SELECT
            | GET_GROUP_ID_LIST
            | BATCH_GET_CLIENT_COUNT_BY_GROUP
            | GET_SESSION_BY_CLIENT_ID
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_replies() {
        assert_eq!(name(SEND_TO_ONE), "CMD_SEND_TO_ONE");
        assert_eq!(name(2), "CMD_UNKNOWN");
        let named = (0..=u8::MAX).filter(|&c| name(c) != "CMD_UNKNOWN").count();
        assert_eq!(named, 30);
        assert!(expects_reply(SELECT) && !expects_reply(SEND_TO_ALL));
        assert_eq!((0..=u8::MAX).filter(|&c| expects_reply(c)).count(), 10);
    }
}
