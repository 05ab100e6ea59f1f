//! PHP's float to text conversion (`php_gcvt`), shared by `serialize`,
//! `json_encode` and string casts.
//!
//! PHP asks `zend_dtoa` for the significant digits and the decimal exponent,
//! then lays them out: plain notation while the exponent is within
//! `-4 < exp < precision`, otherwise `d.dddE+x`. `serialize` and `json_encode`
//! use `serialize_precision = -1`, the shortest digits that read back to the
//! same double, with a layout threshold of 17; string casts use `precision = 14`
//! digits. Rust's `{:e}` formatting produces the same digits, once ties
//! between two shortest forms are broken the way `zend_dtoa` breaks them.

use std::io::Write;

/// How many significant digits to print.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Precision {
    /// The shortest digits that read back to the same double (`serialize_precision = -1`).
    Shortest,
    /// At most this many digits, correctly rounded, trailing zeros dropped.
    Digits(usize),
}

/// Appends `v` as PHP prints it; `exp_char` is `E` for `serialize` and casts,
/// `e` for `json_encode`. Infinities and NaN print as `INF`, `-INF`, `NAN`.
pub(crate) fn write(out: &mut Vec<u8>, v: f64, precision: Precision, exp_char: u8) {
    if v.is_nan() {
        out.extend_from_slice(b"NAN");
        return;
    }
    if v.is_infinite() {
        out.extend_from_slice(if v < 0.0 { b"-INF" } else { b"INF" });
        return;
    }
    let (sci, threshold) = match precision {
        Precision::Shortest => (shortest(v.abs()), 17),
        Precision::Digits(p) => {
            let p = p.max(1);
            (format!("{:.*e}", p - 1, v.abs()), p as i32)
        }
    };
    // `sci` is `d[.ddd]e[-]x`: Rust's own output, always in this shape.
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let mut digits: Vec<u8> = mantissa.bytes().filter(|&b| b != b'.').collect();
    while digits.len() > 1 && digits.last() == Some(&b'0') {
        digits.pop();
    }
    // zend_dtoa's `decpt`: the value is 0.DIGITS × 10^decpt.
    let decpt = exp.parse::<i32>().unwrap_or(0) + 1;

    if v.is_sign_negative() {
        out.push(b'-');
    }
    let exponential = if decpt < 0 {
        decpt < -3
    } else {
        decpt > threshold
    };
    if exponential {
        out.push(digits[0]);
        out.push(b'.');
        match &digits[1..] {
            [] => out.push(b'0'),
            rest => out.extend_from_slice(rest),
        }
        out.push(exp_char);
        let e = decpt - 1;
        out.push(if e < 0 { b'-' } else { b'+' });
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{}", e.unsigned_abs());
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', decpt.unsigned_abs() as usize));
        out.extend_from_slice(&digits);
    } else {
        let int_len = decpt as usize;
        if digits.len() <= int_len {
            out.extend_from_slice(&digits);
            out.extend(std::iter::repeat_n(b'0', int_len - digits.len()));
        } else {
            out.extend_from_slice(&digits[..int_len]);
            out.push(b'.');
            out.extend_from_slice(&digits[int_len..]);
        }
    }
}

/// The shortest digits that read back to `a`, the nearest of them to `a` and
/// ties to even, as `zend_dtoa` mode 0 picks them. Rust's shortest form has
/// the right length but may round a tie the other way (1956803448537645.25
/// gives `…45.3`, PHP `…45.2`); the correctly rounded form of that length is
/// the nearest one by construction, so it wins whenever it reads back.
fn shortest(a: f64) -> String {
    let short = format!("{a:e}");
    let digits = short
        .split('e')
        .next()
        .map_or(1, |m| m.bytes().filter(u8::is_ascii_digit).count());
    let exact = format!("{:.*e}", digits.saturating_sub(1), a);
    if exact.parse::<f64>() == Ok(a) {
        exact
    } else {
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(v: f64, p: Precision, e: u8) -> String {
        let mut out = Vec::new();
        write(&mut out, v, p, e);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn matches_php_8() {
        // Outputs of PHP 8.2 `serialize()` (and `json_encode()` with `e`).
        let cases: &[(f64, &str)] = &[
            (0.1, "0.1"),
            (1e25, "1.0E+25"),
            (2.0, "2"),
            (-0.0, "-0"),
            (0.0, "0"),
            (1e15, "1000000000000000"),
            (1e16, "10000000000000000"),
            (1e17, "1.0E+17"),
            (123456789012345678.0, "1.2345678901234568E+17"),
            (0.0001, "0.0001"),
            (0.00001, "1.0E-5"),
            (1.5e-7, "1.5E-7"),
            (1.0 / 3.0, "0.3333333333333333"),
            (5e-324, "5.0E-324"),
            (f64::MAX, "1.7976931348623157E+308"),
            (100.0, "100"),
            (12345.678, "12345.678"),
            // Exactly halfway between two 17-digit decimals: PHP rounds to even.
            (1_956_803_448_537_645.0 + 0.25, "1956803448537645.2"),
            (f64::INFINITY, "INF"),
            (f64::NEG_INFINITY, "-INF"),
            (f64::NAN, "NAN"),
        ];
        for &(v, want) in cases {
            assert_eq!(show(v, Precision::Shortest, b'E'), want, "{v:e}");
        }
        assert_eq!(show(1e25, Precision::Shortest, b'e'), "1.0e+25");
        // String casts: precision 14.
        assert_eq!(show(1e14, Precision::Digits(14), b'E'), "1.0E+14");
        assert_eq!(
            show(123456789012345.0, Precision::Digits(14), b'E'),
            "1.2345678901234E+14"
        );
        assert_eq!(show(0.1 + 0.2, Precision::Digits(14), b'E'), "0.3");
    }
}
