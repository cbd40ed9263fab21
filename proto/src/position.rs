//! Where in a configuration file a parser's error is, as `FILE:LINE:COLUMN`: the agent's
//! and the collector's configuration files report their errors the same way.

use std::path::Path;

/// `origin:LINE:COLUMN` of byte `offset` of `text` (1-based; the offset is clamped).
pub fn position(text: &str, offset: usize, origin: &Path) -> String {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{}:{line}:{column}", origin.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_are_one_based() {
        let text = "a = 1\nbb = x\n";
        let p = Path::new("f.toml");
        assert_eq!(position(text, 0, p), "f.toml:1:1");
        assert_eq!(position(text, 11, p), "f.toml:2:6");
        assert_eq!(position(text, 999, p), "f.toml:3:1");
    }
}
