//! PHP's ordered array: insertion-ordered `(key, value)` pairs with unique keys.

use std::collections::HashMap;

use super::{Key, Value};

/// A PHP array: an ordered map from [`Key`] to [`Value`].
///
/// Keys are unique; inserting an existing key replaces its value in place,
/// keeping its position, as PHP's `$a[$k] = $v` does. Lookups scan the pairs,
/// which suits the small arrays of sessions and requests; decoders build large
/// arrays through an index, so a reply with many entries stays linear.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Array(Vec<(Key, Value)>);

impl Array {
    /// An empty array.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// A list: the values under keys `0, 1, 2, …`.
    pub fn list<V: Into<Value>>(values: impl IntoIterator<Item = V>) -> Self {
        Self(
            values
                .into_iter()
                .zip(0..)
                .map(|(v, i)| (Key::Int(i), v.into()))
                .collect(),
        )
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value under `key`.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.position(key).map(|i| &self.0[i].1)
    }

    /// The value under the key PHP uses for the string `key` (`"5"` means `5`).
    pub fn get_str(&self, key: &str) -> Option<&Value> {
        self.get(&Key::from(key))
    }

    /// The value under `key`, mutably.
    pub fn get_mut(&mut self, key: &Key) -> Option<&mut Value> {
        self.position(key).map(|i| &mut self.0[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &Key) -> bool {
        self.position(key).is_some()
    }

    /// Sets `key` to `value`: in place if the key exists (returning the old
    /// value), appended otherwise.
    pub fn insert(&mut self, key: impl Into<Key>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let value = value.into();
        match self.position(&key) {
            Some(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            None => {
                self.0.push((key, value));
                None
            }
        }
    }

    /// Removes `key`, keeping the order of the rest (PHP's `unset`).
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        self.position(key).map(|i| self.0.remove(i).1)
    }

    /// The entries in order.
    pub fn iter(&self) -> std::slice::Iter<'_, (Key, Value)> {
        self.0.iter()
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.0.iter().map(|(k, _)| k)
    }

    /// The values in order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.0.iter().map(|(_, v)| v)
    }

    /// Whether the keys are exactly `0, 1, 2, …` in order, which is when
    /// `json_encode` writes a JSON array rather than an object.
    pub fn is_list(&self) -> bool {
        self.0.iter().zip(0..).all(|((k, _), i)| *k == Key::Int(i))
    }

    /// The entries, in order.
    pub fn into_pairs(self) -> Vec<(Key, Value)> {
        self.0
    }

    fn position(&self, key: &Key) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == key)
    }
}

impl<'a> IntoIterator for &'a Array {
    type Item = &'a (Key, Value);
    type IntoIter = std::slice::Iter<'a, (Key, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for Array {
    type Item = (Key, Value);
    type IntoIter = std::vec::IntoIter<(Key, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: Into<Key>, V: Into<Value>> FromIterator<(K, V)> for Array {
    /// Collects pairs like successive `$a[$k] = $v`: a repeated key keeps its
    /// first position and takes the last value.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut b = Builder::with_capacity(0);
        for (k, v) in iter {
            b.insert(k.into(), v.into());
        }
        b.finish()
    }
}

/// Builds an array with PHP's replace-in-place rule in linear time: past a few
/// entries, keys are found through a hash index instead of a scan.
pub(super) struct Builder {
    pairs: Vec<(Key, Value)>,
    index: Option<HashMap<Key, usize>>,
}

/// Below this many entries a scan is cheaper than hashing.
const INDEX_FROM: usize = 16;

impl Builder {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            pairs: Vec::with_capacity(n),
            index: None,
        }
    }

    pub(super) fn from_array(a: Array) -> Self {
        Self {
            pairs: a.0,
            index: None,
        }
    }

    fn position(&mut self, key: &Key) -> Option<usize> {
        if self.index.is_none() && self.pairs.len() >= INDEX_FROM {
            let index = self
                .pairs
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect();
            self.index = Some(index);
        }
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.pairs.iter().position(|(k, _)| k == key),
        }
    }

    pub(super) fn get_mut(&mut self, key: &Key) -> Option<&mut Value> {
        self.position(key).map(|i| &mut self.pairs[i].1)
    }

    pub(super) fn insert(&mut self, key: Key, value: Value) {
        match self.position(&key) {
            Some(i) => self.pairs[i].1 = value,
            None => {
                if let Some(index) = &mut self.index {
                    index.insert(key.clone(), self.pairs.len());
                }
                self.pairs.push((key, value));
            }
        }
    }

    pub(super) fn finish(self) -> Array {
        Array(self.pairs)
    }
}

/// PHP's `array_replace_recursive($base, $new)`: every entry of `new`
/// replaces the entry of `base` under the same key (in place) or is appended;
/// where both values are arrays, they are merged the same way instead.
///
/// This is how a gateway applies `CMD_UPDATE_SESSION` (docs/GATEWAY-PROTOCOL.md §3.3).
pub fn array_replace_recursive(base: &Array, new: &Array) -> Array {
    let mut out = Builder::from_array(base.clone());
    for (k, v) in new {
        if let (Some(Value::Array(old)), Value::Array(new)) = (out.get_mut(k), v) {
            *old = array_replace_recursive(old, new);
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_in_place() {
        let mut a = Array::new();
        a.insert("a", 1);
        a.insert("b", 2);
        assert_eq!(a.insert("a", 3), Some(Value::Int(1)));
        a.insert("7", "seven");
        assert_eq!(
            a.keys().cloned().collect::<Vec<_>>(),
            [Key::from("a"), Key::from("b"), Key::Int(7)]
        );
        assert_eq!(a.get_str("a"), Some(&Value::Int(3)));
        assert_eq!(a.get(&Key::Int(7)), a.get_str("7"));
        assert_eq!(a.remove(&Key::from("b")), Some(Value::Int(2)));
        assert_eq!(a.len(), 2);
        assert!(Array::list(["x", "y"]).is_list() && !a.is_list() && Array::new().is_list());
    }

    #[test]
    fn collecting_many_keys_uses_the_index() {
        let a: Array = (0..1000i64).chain(0..1000).map(|i| (i, i)).collect();
        assert_eq!(a.len(), 1000);
        assert!(a.is_list());
    }

    #[test]
    fn replace_recursive() {
        let base: Array = [
            ("uid", Value::from("alice")),
            ("tags", Value::Array(Array::list(["a", "b"]))),
            ("n", Value::Int(1)),
        ]
        .into_iter()
        .collect();
        let new: Array = [
            ("tags", Value::Array([(1, "B")].into_iter().collect())),
            ("n", Value::Array(Array::list([1]))),
            ("x", Value::Null),
        ]
        .into_iter()
        .collect();
        let got = array_replace_recursive(&base, &new);
        // PHP 8.2: a:4:{s:3:"uid";s:5:"alice";s:4:"tags";a:2:{i:0;s:1:"a";i:1;s:1:"B";}s:1:"n";a:1:{i:0;i:1;}s:1:"x";N;}
        assert_eq!(
            super::super::to_bytes(&Value::Array(got)),
            br#"a:4:{s:3:"uid";s:5:"alice";s:4:"tags";a:2:{i:0;s:1:"a";i:1;s:1:"B";}s:1:"n";a:1:{i:0;i:1;}s:1:"x";N;}"#
        );
    }

    #[test]
    fn membership_and_owned_iteration() {
        let a: Array = [("x", 1i64), ("y", 2)].into_iter().collect();
        assert!(a.contains_key(&Key::from_bytes(bytes::Bytes::from_static(b"x"))));
        assert!(!a.contains_key(&Key::Int(0)));
        let pairs = a.clone().into_pairs();
        assert_eq!(pairs.len(), 2);
        assert_eq!(
            pairs[1],
            (
                Key::from_bytes(bytes::Bytes::from_static(b"y")),
                Value::Int(2)
            )
        );
        let values: Vec<Value> = a.into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, [Value::Int(1), Value::Int(2)]);
    }
}
