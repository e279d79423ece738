//! Grammars that field formats share: DNS labels and UUIDs. A leaf: it imports nothing, so
//! the tenant model and the vendors' own field formats can both use it.

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`: a DNS label, lower case.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// 8-4-4-4-12 hex digits.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `Ok` when `ok`, else the description of what is wrong.
pub fn problem(ok: bool, description: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(description.to_owned())
    }
}
