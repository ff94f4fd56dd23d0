//! Lifetimes written as `12h`, `90d` or `10y` (a bare number means days).

use std::fmt;
use std::str::FromStr;

use time::Duration;

/// A certificate or CRL lifetime parsed from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime(pub Duration);

impl FromStr for Lifetime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: i64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a lifetime like 12h, 90d or 10y"))?;
        let hours = match unit {
            "h" => n,
            "" | "d" => n.saturating_mul(24),
            "y" => n.saturating_mul(24 * 365),
            _ => return Err(format!("unknown unit {unit:?} in {s:?}: use h, d or y")),
        };
        if hours <= 0 {
            return Err(format!("lifetime {s:?} must be positive"));
        }
        Ok(Self(Duration::hours(hours)))
    }
}

impl fmt::Display for Lifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hours = self.0.whole_hours();
        if hours % 24 == 0 {
            write!(f, "{}d", hours / 24)
        } else {
            write!(f, "{hours}h")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let check = |text: &str, hours: i64| {
            assert_eq!(
                text.parse::<Lifetime>(),
                Ok(Lifetime(Duration::hours(hours))),
                "{text}"
            );
        };
        check("12h", 12);
        check("90d", 90 * 24);
        check("90", 90 * 24);
        check("10y", 10 * 365 * 24);
        for bad in ["", "d", "0d", "5w", "-3d", "1.5d"] {
            assert!(bad.parse::<Lifetime>().is_err(), "{bad:?}");
        }
    }
}
