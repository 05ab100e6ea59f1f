//! What a client may do, as a list of rules (the rules are on [`Permissions`],
//! which is public where this module is not).

use std::fmt;

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// Join or leave a group.
    Join,
    /// Push to a user.
    PushUser,
    /// Push to a group.
    PushGroup,
    /// Push to a connection.
    PushConn,
    /// Push to everyone.
    PushAll,
    /// Ask whether a user is online.
    QueryOnline,
    /// Ask how many are in a group.
    QueryGroup,
}

impl Action {
    /// The rule prefix, and whether the rule names a pattern after it.
    fn prefix(self) -> (&'static str, bool) {
        match self {
            Action::Join => ("join:", true),
            Action::PushUser => ("push:user:", true),
            Action::PushGroup => ("push:group:", true),
            Action::PushConn => ("push:conn", false),
            Action::PushAll => ("push:all", false),
            Action::QueryOnline => ("query:online:", true),
            Action::QueryGroup => ("query:group:", true),
        }
    }

    const ALL: [Action; 7] = [
        Action::Join,
        Action::PushUser,
        Action::PushGroup,
        Action::PushConn,
        Action::PushAll,
        Action::QueryOnline,
        Action::QueryGroup,
    ];
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix().0.trim_end_matches(':'))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Everything,
    /// An action; `pattern` is empty for actions without one.
    Allow {
        action: Action,
        pattern: String,
    },
}

/// A client's permissions: a list of rules.
///
/// A rule is an action, then for most actions a name pattern in which `*`
/// matches any run of characters:
///
/// | rule | allows |
/// |---|---|
/// | `join:PATTERN` | joining and leaving the groups it matches |
/// | `push:user:PATTERN` | pushing to users (`to_user`, `to_users`: every uid must match) |
/// | `push:group:PATTERN` | pushing to the groups it matches |
/// | `push:conn` | pushing to a connection by its id |
/// | `push:all` | pushing to everyone |
/// | `query:online:PATTERN` | asking whether the users it matches are online |
/// | `query:group:PATTERN` | asking how many are in the groups it matches |
/// | `*` | everything |
///
/// Patterns hold any character, `:` included: `join:room:*` matches the group
/// `room:42`. Nothing is allowed that no rule allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    rules: Vec<Rule>,
}

impl Permissions {
    /// Nothing allowed.
    pub fn none() -> Self {
        Self::default()
    }

    /// Everything allowed (development mode).
    pub fn everything() -> Self {
        Self {
            rules: vec![Rule::Everything],
        }
    }

    /// Reads rules; an error names the first one that is not a rule.
    pub fn parse<S: AsRef<str>>(rules: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let mut p = Self::none();
        for r in rules {
            p.rules.push(parse_rule(r.as_ref().trim())?);
        }
        Ok(p)
    }

    /// Adds `other`'s rules.
    pub fn extend(&mut self, other: &Permissions) {
        for r in &other.rules {
            if !self.rules.contains(r) {
                self.rules.push(r.clone());
            }
        }
    }

    /// Allows joining, leaving and counting the group `name` exactly (the
    /// groups of a token).
    pub fn grant_group(&mut self, name: &str) {
        // A `*` in a group's name is only that character: escape nothing,
        // match exactly, by a rule that no pattern syntax can widen.
        for action in [Action::Join, Action::QueryGroup] {
            let rule = Rule::Allow {
                action,
                pattern: escape(name),
            };
            if !self.rules.contains(&rule) {
                self.rules.push(rule);
            }
        }
    }

    /// Whether `action` on `name` (ignored by actions without a pattern) is
    /// allowed.
    pub fn allows(&self, action: Action, name: &str) -> bool {
        self.rules.iter().any(|r| match r {
            Rule::Everything => true,
            Rule::Allow { action: a, pattern } => {
                *a == action && (!action.prefix().1 || matches(pattern, name))
            }
        })
    }

    /// Whether everything is allowed.
    pub fn is_everything(&self) -> bool {
        self.rules.contains(&Rule::Everything)
    }

    /// The rules, as they are written.
    pub fn to_strings(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|r| match r {
                Rule::Everything => "*".to_owned(),
                Rule::Allow { action, pattern } => format!("{}{pattern}", action.prefix().0),
            })
            .collect()
    }
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    if s == "*" {
        return Ok(Rule::Everything);
    }
    for action in Action::ALL {
        let (prefix, named) = action.prefix();
        if named {
            if let Some(pattern) = s.strip_prefix(prefix) {
                if pattern.is_empty() {
                    return Err(format!("{s:?} names no pattern (use {prefix}* for all)"));
                }
                return Ok(Rule::Allow {
                    action,
                    pattern: pattern.to_owned(),
                });
            }
        } else if s == prefix {
            return Ok(Rule::Allow {
                action,
                pattern: String::new(),
            });
        }
    }
    Err(format!(
        "{s:?} is not a rule: use join:P, push:user:P, push:group:P, push:conn, push:all, query:online:P, query:group:P or *"
    ))
}

/// Whether `pattern` matches `name`: `*` matches any run of characters,
/// `\*` and `\\` are a literal `*` and `\`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    matches(pattern, name)
}

/// A pattern that matches `name` only: `\*` for a literal `*`, `\\` for `\`.
fn escape(name: &str) -> String {
    name.replace('\\', "\\\\").replace('*', "\\*")
}

/// Whether `pattern` (`*` any run, `\*` and `\\` literal) matches `name`,
/// without recursion: linear in practice, so no pattern can be made to cost
/// more than a pass per star.
fn matches(pattern: &str, name: &str) -> bool {
    // Tokens: Some(c) a literal character, None a star.
    let mut toks: Vec<Option<char>> = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => toks.push(Some(chars.next().unwrap_or('\\'))),
            '*' => toks.push(None),
            c => toks.push(Some(c)),
        }
    }
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match toks.get(p) {
            Some(Some(c)) if *c == name[n] => {
                p += 1;
                n += 1;
            }
            Some(None) => {
                star = Some((p, n));
                p += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    toks[p..].iter().all(Option::is_none)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_by_stars_and_literal_escapes() {
        assert!(matches("room-*", "room-1"));
        assert!(matches("room-*", "room-"));
        assert!(!matches("room-*", "roo"));
        assert!(matches("*", ""));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("lobby", "lobby"));
        assert!(!matches("lobby", "lobby2"));
        assert!(matches(&escape("a*"), "a*"));
        assert!(!matches(&escape("a*"), "ab"));
        assert!(matches(&escape("a\\b"), "a\\b"));
    }

    #[test]
    fn rules_allow_exactly_what_they_name() {
        let p = Permissions::parse([
            "join:room:*",
            "push:group:lobby",
            "push:all",
            "query:online:*",
        ])
        .unwrap();
        assert!(p.allows(Action::Join, "room:42"));
        assert!(!p.allows(Action::Join, "lobby"));
        assert!(p.allows(Action::PushGroup, "lobby"));
        assert!(!p.allows(Action::PushGroup, "room:1"));
        assert!(p.allows(Action::PushAll, ""));
        assert!(!p.allows(Action::PushConn, ""));
        assert!(!p.allows(Action::PushUser, "bob"));
        assert!(p.allows(Action::QueryOnline, "bob"));
        assert!(!p.allows(Action::QueryGroup, "lobby"));
        assert!(Permissions::everything().allows(Action::PushConn, ""));
        assert!(!Permissions::none().allows(Action::Join, "x"));
        let mut q = Permissions::none();
        q.grant_group("a*");
        assert!(q.allows(Action::Join, "a*") && q.allows(Action::QueryGroup, "a*"));
        assert!(!q.allows(Action::Join, "ab"), "a token's group is exact");
        assert_eq!(p.to_strings()[0], "join:room:*");
    }

    #[test]
    fn a_bad_rule_is_an_error_that_lists_the_grammar() {
        let e = Permissions::parse(["push:everyone"]).unwrap_err();
        assert!(
            e.contains("push:everyone") && e.contains("push:group:P"),
            "{e}"
        );
        assert!(
            Permissions::parse(["join:"])
                .unwrap_err()
                .contains("join:*")
        );
        assert!(Permissions::parse(["push:all:x"]).is_err());
    }
}
