//! Byte sizes written as `NNN(KiB|MiB|GiB)` in manifests.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A size in bytes, written in manifests as `512MiB`, `4GiB`, `64KiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

impl Size {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// A size of `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Size(n * MIB)
    }

    /// A size of `n` gibibytes.
    pub const fn gib(n: u64) -> Self {
        Size(n * GIB)
    }

    /// Parses `NNN(KiB|MiB|GiB)`; the reason is returned on failure.
    pub fn parse(s: &str) -> Result<Self, String> {
        let not_a_size =
            || format!("{s:?} is not a size (expected NNN followed by KiB, MiB or GiB)");
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(not_a_size());
        }
        let (num, unit) = s.split_at(digits);
        let n: u64 = num.parse().map_err(|_| not_a_size())?;
        let mult = match unit {
            "KiB" => KIB,
            "MiB" => MIB,
            "GiB" => GIB,
            _ => return Err(not_a_size()),
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_multiple_of(GIB) && b > 0 {
            write!(f, "{}GiB", b / GIB)
        } else if b.is_multiple_of(MIB) && b > 0 {
            write!(f, "{}MiB", b / MIB)
        } else {
            write!(f, "{}KiB", b.div_ceil(KIB))
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 512MiB or 4GiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "{v} is not a size (write a unit: {v}MiB or {v}GiB)"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                Err(E::custom(format!("{v} is not a size")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(Size::parse("512MiB"), Ok(Size(512 * MIB)));
        assert_eq!(Size::parse("4GiB"), Ok(Size(4 * GIB)));
        assert_eq!(Size::parse("64KiB"), Ok(Size(64 * KIB)));
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "12XB",
            "",
            "GiB",
            "1.5GiB",
            "-1GiB",
            "12 GiB",
            "12gib",
            "99999999999999999999GiB",
        ] {
            assert!(Size::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert!(Size::parse("12XB").is_err_and(|e| e.contains("\"12XB\" is not a size")));
    }

    #[test]
    fn displays_round_trip() {
        for s in ["512MiB", "4GiB", "3KiB"] {
            assert_eq!(Size::parse(s).map(|v| v.to_string()).as_deref(), Ok(s));
        }
    }
}
