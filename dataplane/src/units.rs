//! Byte sizes as people write them: `4096`, `64KiB`, `16MiB`, `1GiB` (also `k`, `m`, `g`),
//! for the sizes of pools, segments, batches and messages in flags, config files and reports.

/// A size that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size (examples: 4096, 64KiB, 16MiB, 1GiB)")]
    NotASize(String),
    #[error("unknown size unit {unit:?} in {input:?} (use KiB, MiB, GiB)")]
    UnknownUnit { unit: String, input: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

pub fn parse_bytes(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeError::NotASize(s.into()))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => {
            return Err(SizeError::UnknownUnit {
                unit: other.into(),
                input: s.into(),
            })
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.into()))
}

pub fn format_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if n >= size && n % size == 0 {
            return format!("{}{name}", n / size);
        }
        if n >= size {
            return format!("{:.1}{name}", n as f64 / size as f64);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_back() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("16m"), Ok(16 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        let e = |s| parse_bytes(s).unwrap_err().to_string();
        assert!(e("lots").contains("not a size"));
        assert!(e("3 parsecs").contains("unknown size unit"));
        assert!(e("99999999999TiB").contains("too large"));
        assert_eq!(format_bytes(16 << 20), "16MiB");
        assert_eq!(format_bytes(1536), "1.5KiB");
        assert_eq!(format_bytes(10), "10B");
    }
}
