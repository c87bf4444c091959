//! Tasks: author-defined checks that run inside machines (format shared with content front matter).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// One task.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Task {
    /// Setup task: runs once at start.
    #[serde(default)]
    pub init: bool,
    /// Machine it runs on; default: the first machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// User it runs as; default root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Bash script; exit 0 = passed.
    pub run: String,
    /// Tasks that must complete first.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Runs after a failed `run`; its output is shown as a hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hintcheck: Option<String>,
    /// Runs before `run`; non-zero means the task failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failcheck: Option<String>,
    /// Per attempt (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Between attempts (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The student types an answer; the script sees it as `$INPUT`.
    #[serde(default)]
    pub input: bool,
    /// Background helper: not shown, not counted.
    #[serde(default)]
    pub helper: bool,
}

/// A duration written as `500ms`, `10s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Parses `NNN(ms|s|m|h)`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration (expected e.g. 500ms, 10s, 5m, 1h)");
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (num, unit) = s.split_at(digits);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let d = match unit {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
            "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        Ok(Duration(d))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 10s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("10s").map(|d| d.0.as_secs()), Ok(10));
        assert_eq!(Duration::parse("500ms").map(|d| d.0.as_millis()), Ok(500));
        assert_eq!(Duration::parse("2m").map(|d| d.0.as_secs()), Ok(120));
        assert!(Duration::parse("10").is_err());
        assert!(Duration::parse("s").is_err());
        assert!(Duration::parse("1.5s").is_err());
    }
}
