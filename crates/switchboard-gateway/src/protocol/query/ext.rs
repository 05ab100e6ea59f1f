//! The JSON `ext_data` of list-carrying commands (docs/GATEWAY-PROTOCOL.md §3.4), byte-exact
//! with what `Lib\Gateway` sends and read the way `Gateway.php` reads it.
//!
//! PHP builds these with `json_encode` of PHP arrays, so two details decide the
//! bytes: lists are JSON arrays while maps keyed by connection id
//! (`[$id => $id]`) are JSON objects (`{"1":1}`), and strings are escaped PHP's
//! way. The gateway `json_decode`s them into arrays, iterates uid, group and
//! `connections` lists by value and looks exclusions up by key; decoding here
//! does the same, so a map and a list with the same values read alike.

use std::fmt;

use super::super::php::{self, Array, JsonError, Key, Value};

/// A uid or group as PHP carries it in JSON: an integer or a string.
///
/// The gateway files uids and groups under PHP array keys, where `"5"` and `5`
/// are the same: compare them with [`Id::to_key`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    /// A PHP integer, written as a JSON number.
    Int(i64),
    /// A PHP string, written as a JSON string.
    Str(String),
}

impl Id {
    /// The array key the gateway files this uid or group under.
    pub fn to_key(&self) -> Key {
        match self {
            Id::Int(i) => Key::Int(*i),
            Id::Str(s) => Key::from(s.as_str()),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Id::Int(i) => Value::Int(*i),
            Id::Str(s) => Value::from(s.as_str()),
        }
    }

    /// A decoded list element, cast the way PHP casts an array key.
    fn from_value(v: &Value) -> Result<Self, ExtError> {
        Ok(match v {
            Value::Int(i) => Id::Int(*i),
            Value::Str(s) => Id::Str(String::from_utf8_lossy(s).into_owned()),
            Value::Bool(b) => Id::Int(i64::from(*b)),
            Value::Null => Id::Str(String::new()),
            Value::Float(f) if f.is_finite() && f.abs() < 9.2e18 => Id::Int(*f as i64),
            Value::Float(_) | Value::Array(_) => return Err(ExtError::Shape("uid or group")),
        })
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Int(i) => write!(f, "{i}"),
            Id::Str(s) => f.write_str(s),
        }
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::Str(s.to_owned())
    }
}

impl From<String> for Id {
    fn from(s: String) -> Self {
        Id::Str(s)
    }
}

impl From<i64> for Id {
    fn from(i: i64) -> Self {
        Id::Int(i)
    }
}

/// `ext_data` that the gateway could not act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtError {
    /// Not JSON.
    #[error("ext_data is not JSON")]
    Json(#[source] JsonError),
    /// JSON of the wrong shape; names what was wrong.
    #[error("ext_data has an unexpected {0}")]
    Shape(&'static str),
}

/// A JSON list of uids or groups: `ext_data` of `CMD_SEND_TO_UID` (`["bob"]`),
/// `CMD_BATCH_GET_CLIENT_ID_BY_UID` and `CMD_BATCH_GET_CLIENT_COUNT_BY_GROUP`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdList(pub Vec<Id>);

impl IdList {
    /// The `ext_data` bytes PHP sends (`json_encode` of a list).
    pub fn encode(&self) -> Vec<u8> {
        encode(&id_list(&self.0))
    }

    /// Reads a JSON array, or an object whose values are taken in order.
    pub fn decode(ext_data: &[u8]) -> Result<Self, ExtError> {
        let v = decode(ext_data)?;
        ids(&v, "uid or group list").map(IdList)
    }
}

/// `ext_data` of `CMD_SEND_TO_ALL`: whom a broadcast on one gateway reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendToAll {
    /// Every connection (empty `ext_data`).
    All,
    /// Only these connections: `{"connections":{"1":1,…}}`.
    Connections(Vec<u32>),
    /// Every connection but these: `{"exclude":{"1":1,…}}`.
    Exclude(Vec<u32>),
}

impl SendToAll {
    /// The `ext_data` bytes PHP sends.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SendToAll::All => Vec::new(),
            SendToAll::Connections(ids) => encode(&object([("connections", id_map(ids))])),
            SendToAll::Exclude(ids) => encode(&object([("exclude", id_map(ids))])),
        }
    }

    /// Reads `ext_data` as the gateway does: a non-null `connections` wins and
    /// is read by value; otherwise a non-empty `exclude` is read by key.
    /// Values that are not connection ids are skipped: they match no connection.
    pub fn decode(ext_data: &[u8]) -> Result<Self, ExtError> {
        if ext_data.is_empty() {
            return Ok(SendToAll::All);
        }
        let v = decode(ext_data)?;
        let a = v.as_array().ok_or(ExtError::Shape("send-to-all object"))?;
        match a.get_str("connections") {
            Some(Value::Null) | None => {}
            Some(c) => return Ok(SendToAll::Connections(conn_values(c))),
        }
        match a.get_str("exclude") {
            Some(e) if !e.is_empty() => conn_keys(e).map(SendToAll::Exclude),
            _ => Ok(SendToAll::All),
        }
    }
}

/// `ext_data` of `CMD_SEND_TO_GROUP`: `{"group":[…],"exclude":null}` or with
/// an exclude map keyed by connection id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendToGroup {
    /// The groups whose members get the message.
    pub groups: Vec<Id>,
    /// Connections of this gateway to leave out.
    pub exclude: Option<Vec<u32>>,
}

impl SendToGroup {
    /// The `ext_data` bytes PHP sends.
    pub fn encode(&self) -> Vec<u8> {
        let exclude = self.exclude.as_deref().map_or(Value::Null, id_map);
        encode(&object([
            ("group", id_list(&self.groups)),
            ("exclude", exclude),
        ]))
    }

    /// Reads `ext_data` as the gateway does: groups by value, exclusions by key.
    pub fn decode(ext_data: &[u8]) -> Result<Self, ExtError> {
        let v = decode(ext_data)?;
        let a = v
            .as_array()
            .ok_or(ExtError::Shape("send-to-group object"))?;
        let groups = ids(a.get_str("group").unwrap_or(&Value::Null), "group list")?;
        let exclude = match a.get_str("exclude") {
            None | Some(Value::Null) => None,
            Some(e) => Some(conn_keys(e)?),
        };
        Ok(Self { groups, exclude })
    }
}

/// One condition of a `CMD_SELECT`; a connection matching any of them is selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Members of any of these groups (`"groups"`).
    Groups(Vec<Id>),
    /// Connections bound to any of these uids (`"uid"`).
    Uids(Vec<Id>),
    /// These connections (`"connection_id"`, a map keyed by id).
    ConnectionIds(Vec<u32>),
}

/// `ext_data` of `CMD_SELECT`: `{"fields":["uid"],"where":{"groups":["g1"]}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Select {
    /// Which properties to return per connection: `uid`, `groups`, `session`
    /// (any other name yields null).
    pub fields: Vec<String>,
    /// Conditions in the order the gateway applies them, which is the order of
    /// the reply; none selects every connection (`"where":[]`).
    pub conditions: Vec<Condition>,
}

impl Select {
    /// The `ext_data` bytes PHP sends.
    pub fn encode(&self) -> Vec<u8> {
        let fields = Value::Array(Array::list(self.fields.iter().map(String::as_str)));
        let conditions: Array = self
            .conditions
            .iter()
            .map(|c| match c {
                Condition::Groups(g) => ("groups", id_list(g)),
                Condition::Uids(u) => ("uid", id_list(u)),
                Condition::ConnectionIds(c) => ("connection_id", id_map(c)),
            })
            .collect();
        encode(&object([
            ("fields", fields),
            ("where", Value::Array(conditions)),
        ]))
    }

    /// Reads `ext_data` as the gateway does. PHP answers JSON that decodes to
    /// an empty value with an empty reply; that is [`ExtError::Shape`] here.
    pub fn decode(ext_data: &[u8]) -> Result<Self, ExtError> {
        let v = decode(ext_data)?;
        let a = match v.as_array() {
            Some(a) if !a.is_empty() => a,
            _ => return Err(ExtError::Shape("select object")),
        };
        let fields = match a.get_str("fields") {
            Some(Value::Array(f)) => f
                .values()
                .map(|f| {
                    f.scalar_to_bytes()
                        .map(|s| String::from_utf8_lossy(&s).into_owned())
                })
                .collect::<Option<_>>()
                .ok_or(ExtError::Shape("select field"))?,
            _ => Vec::new(),
        };
        let mut conditions = Vec::new();
        if let Some(Value::Array(w)) = a.get_str("where") {
            for (k, items) in w {
                let cond = match k {
                    Key::Str(k) if &k[..] == b"groups" => Condition::Groups(ids_or_none(items)?),
                    Key::Str(k) if &k[..] == b"uid" => Condition::Uids(ids_or_none(items)?),
                    Key::Str(k) if &k[..] == b"connection_id" => {
                        Condition::ConnectionIds(conn_values(items))
                    }
                    _ => return Err(ExtError::Shape("select condition")),
                };
                conditions.push(cond);
            }
        }
        Ok(Self { fields, conditions })
    }
}

/// `json_encode` of a value built in this module: only UTF-8 strings and
/// integers, which PHP's encoder always accepts.
fn encode(v: &Value) -> Vec<u8> {
    php::json_encode(v).expect("ext_data holds only UTF-8 strings and integers")
}

fn decode(ext_data: &[u8]) -> Result<Value, ExtError> {
    php::json_decode(ext_data).map_err(ExtError::Json)
}

fn object<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Array(members.into_iter().collect())
}

fn id_list(ids: &[Id]) -> Value {
    Value::Array(Array::list(ids.iter().map(Id::to_value)))
}

/// PHP's `[$id => $id, …]`: an object keyed by id, or a list if the ids happen
/// to be `0, 1, …`; a repeated id keeps its first place, as in PHP.
fn id_map(ids: &[u32]) -> Value {
    Value::Array(ids.iter().map(|&i| (i, i)).collect())
}

/// The values of a decoded list or object, as ids.
fn ids(v: &Value, what: &'static str) -> Result<Vec<Id>, ExtError> {
    v.as_array()
        .ok_or(ExtError::Shape(what))?
        .values()
        .map(Id::from_value)
        .collect()
}

/// Like [`ids`], but a non-array reads as no ids (PHP's `foreach` over a scalar).
fn ids_or_none(v: &Value) -> Result<Vec<Id>, ExtError> {
    match v {
        Value::Array(_) => ids(v, "uid or group list"),
        _ => Ok(Vec::new()),
    }
}

/// A connection id from a key or value, if it can name one.
fn conn_id(v: &Value) -> Option<u32> {
    match Key::from_bytes(v.scalar_to_bytes()?) {
        Key::Int(i) => u32::try_from(i).ok(),
        Key::Str(_) => None,
    }
}

/// Connection ids listed by value (`connections`, `connection_id`).
fn conn_values(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| a.values().filter_map(conn_id).collect())
        .unwrap_or_default()
}

/// Connection ids listed by key (`exclude`).
fn conn_keys(v: &Value) -> Result<Vec<u32>, ExtError> {
    let a = v.as_array().ok_or(ExtError::Shape("exclude map"))?;
    Ok(a.keys()
        .filter_map(|k| match k {
            Key::Int(i) => u32::try_from(*i).ok(),
            Key::Str(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn float_ids_are_cast_like_php_array_keys() {
        assert_eq!(
            IdList::decode(b"[3.7,-2.5,true,null]").unwrap().0,
            [Id::Int(3), Id::Int(-2), Id::Int(1), Id::Str(String::new())]
        );
        assert!(IdList::decode(b"[1e19]").is_err(), "past i64: refused");
        assert!(IdList::decode(b"[-1e19]").is_err());
        assert_eq!(Id::Int(-4).to_string(), "-4");
        assert_eq!(Id::from("g").to_string(), "g");
    }

    #[test]
    fn php_bytes() {
        // Captured from Lib\Gateway (docs/GATEWAY-PROTOCOL.md §3.4).
        assert_eq!(text(IdList(vec!["bob".into()]).encode()), r#"["bob"]"#);
        assert_eq!(
            text(IdList(vec![Id::Int(7), "a/é".into()]).encode()),
            r#"[7,"a\/\u00e9"]"#
        );
        assert_eq!(
            text(SendToAll::Connections(vec![1]).encode()),
            r#"{"connections":{"1":1}}"#
        );
        assert_eq!(
            text(SendToAll::Exclude(vec![1, 3, 1]).encode()),
            r#"{"exclude":{"1":1,"3":3}}"#
        );
        // [0 => 0] is a list to PHP.
        assert_eq!(
            text(SendToAll::Exclude(vec![0]).encode()),
            r#"{"exclude":[0]}"#
        );
        assert!(SendToAll::All.encode().is_empty());
        let g = SendToGroup {
            groups: vec!["g1".into()],
            exclude: None,
        };
        assert_eq!(text(g.encode()), r#"{"group":["g1"],"exclude":null}"#);
        let g = SendToGroup {
            groups: vec!["g1".into()],
            exclude: Some(vec![1]),
        };
        assert_eq!(text(g.encode()), r#"{"group":["g1"],"exclude":{"1":1}}"#);
        let s = Select {
            fields: vec!["uid".into()],
            conditions: vec![Condition::Groups(vec!["g1".into()])],
        };
        assert_eq!(
            text(s.encode()),
            r#"{"fields":["uid"],"where":{"groups":["g1"]}}"#
        );
        // getAllUidList(): no conditions is PHP's empty array.
        let s = Select {
            fields: vec!["uid".into()],
            conditions: vec![],
        };
        assert_eq!(text(s.encode()), r#"{"fields":["uid"],"where":[]}"#);
        // getUidByClientId(): connection ids as a map.
        let s = Select {
            fields: vec!["uid".into()],
            conditions: vec![Condition::ConnectionIds(vec![3])],
        };
        assert_eq!(
            text(s.encode()),
            r#"{"fields":["uid"],"where":{"connection_id":{"3":3}}}"#
        );
    }

    #[test]
    fn reads_like_the_gateway() {
        assert_eq!(
            IdList::decode(br#"{"0":"a","2":"b"}"#).unwrap(),
            IdList(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            IdList::decode(b"[5, \"5\", null, true]")
                .unwrap()
                .0
                .iter()
                .map(Id::to_key)
                .collect::<Vec<_>>(),
            [Key::Int(5), Key::Int(5), Key::from(""), Key::Int(1)]
        );
        assert!(matches!(
            IdList::decode(b"\"bob\""),
            Err(ExtError::Shape(_))
        ));
        assert!(matches!(IdList::decode(b"[[1]]"), Err(ExtError::Shape(_))));
        assert!(matches!(IdList::decode(b"["), Err(ExtError::Json(_))));

        assert_eq!(SendToAll::decode(b"").unwrap(), SendToAll::All);
        assert_eq!(
            SendToAll::decode(br#"{"connections":{"1":1,"x":"2","y":"z"}}"#).unwrap(),
            SendToAll::Connections(vec![1, 2])
        );
        assert_eq!(
            SendToAll::decode(br#"{"connections":null,"exclude":{"4":4}}"#).unwrap(),
            SendToAll::Exclude(vec![4])
        );
        // The gateway looks exclusions up by key.
        assert_eq!(
            SendToAll::decode(br#"{"exclude":[7]}"#).unwrap(),
            SendToAll::Exclude(vec![0])
        );
        assert_eq!(
            SendToAll::decode(br#"{"exclude":{}}"#).unwrap(),
            SendToAll::All
        );

        let g = SendToGroup::decode(br#"{"group":{"a":"g1"},"exclude":{"2":2}}"#).unwrap();
        assert_eq!(
            g,
            SendToGroup {
                groups: vec!["g1".into()],
                exclude: Some(vec![2])
            }
        );
        assert!(matches!(
            SendToGroup::decode(br#"{"exclude":null}"#),
            Err(ExtError::Shape("group list"))
        ));

        let s = Select::decode(br#"{"fields":["uid","groups"],"where":{"uid":["u"],"connection_id":{"3":3},"groups":"g"}}"#).unwrap();
        assert_eq!(s.fields, ["uid", "groups"]);
        assert_eq!(
            s.conditions,
            [
                Condition::Uids(vec!["u".into()]),
                Condition::ConnectionIds(vec![3]),
                Condition::Groups(vec![])
            ]
        );
        assert!(
            Select::decode(br#"{"fields":["uid"],"where":{}}"#)
                .unwrap()
                .conditions
                .is_empty()
        );
        assert!(matches!(Select::decode(b"[]"), Err(ExtError::Shape(_))));
        assert!(matches!(
            Select::decode(br#"{"fields":[],"where":{"nope":[]}}"#),
            Err(ExtError::Shape(_))
        ));
    }

    fn id() -> impl Strategy<Value = Id> {
        prop_oneof![
            any::<i64>().prop_map(Id::Int),
            any::<String>().prop_map(Id::Str)
        ]
    }

    fn unique(ids: Vec<u32>) -> Vec<u32> {
        let mut seen = std::collections::HashSet::new();
        ids.into_iter().filter(|i| seen.insert(*i)).collect()
    }

    proptest! {
        #[test]
        fn round_trips(list in prop::collection::vec(id(), 0..6), conns in prop::collection::vec(1u32.., 0..6),
                       fields in prop::collection::vec(any::<String>(), 0..4)) {
            let l = IdList(list.clone());
            prop_assert_eq!(IdList::decode(&l.encode()).unwrap(), l);
            let conns = unique(conns);
            for s in [SendToAll::Connections(conns.clone()), SendToAll::Exclude(conns.clone())] {
                let want = if conns.is_empty() { match s { SendToAll::Exclude(_) => SendToAll::All, ref other => other.clone() } } else { s.clone() };
                prop_assert_eq!(SendToAll::decode(&s.encode()).unwrap(), want);
            }
            let g = SendToGroup { groups: list.clone(), exclude: Some(conns.clone()) };
            prop_assert_eq!(SendToGroup::decode(&g.encode()).unwrap(), g);
            let conditions = vec![Condition::Uids(list.clone()), Condition::ConnectionIds(conns), Condition::Groups(list)];
            let s = Select { fields, conditions };
            prop_assert_eq!(Select::decode(&s.encode()).unwrap(), s);
        }
    }
}
