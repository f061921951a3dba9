//! A unified diff for line-aligned rewrites.
//!
//! The rewrite changes lines in place (it never adds or removes one), so the
//! diff of a file is line i of the old text against line i of the new one.
//! The input is a list of (old, new) line pairs, which makes that alignment
//! part of the type; the output is what `diff -u` prints for such a change,
//! and `patch` applies it.

const CONTEXT: usize = 3;

/// `lines`: (old, new) pairs, each with its line ending (`"\n"`, or nothing
/// for a last line without one).
pub(crate) fn unified(old_name: &str, new_name: &str, lines: &[(&str, &str)]) -> String {
    let changed: Vec<usize> = (0..lines.len()).filter(|i| lines[*i].0 != lines[*i].1).collect();
    if changed.is_empty() {
        return String::new();
    }
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    // Group changes into hunks: two changes share a hunk when their contexts
    // overlap or touch.
    let mut groups: Vec<(usize, usize)> = Vec::new(); // first, last changed index
    for &c in &changed {
        match groups.last_mut() {
            Some((_, last)) if c - *last <= 2 * CONTEXT + 1 => *last = c,
            _ => groups.push((c, c)),
        }
    }
    for (first, last) in groups {
        let start = first.saturating_sub(CONTEXT);
        let end = (last + 1 + CONTEXT).min(lines.len());
        let len = end - start;
        let range = |s: usize, l: usize| {
            if l == 1 { format!("{}", s + 1) } else { format!("{},{}", s + 1, l) }
        };
        out.push_str(&format!("@@ -{} +{} @@\n", range(start, len), range(start, len)));
        let mut i = start;
        while i < end {
            if lines[i].0 == lines[i].1 {
                push_line(&mut out, ' ', lines[i].0);
                i += 1;
                continue;
            }
            let mut j = i;
            while j < end && lines[j].0 != lines[j].1 {
                j += 1;
            }
            for l in &lines[i..j] {
                push_line(&mut out, '-', l.0);
            }
            for l in &lines[i..j] {
                push_line(&mut out, '+', l.1);
            }
            i = j;
        }
    }
    out
}

fn push_line(out: &mut String, mark: char, line: &str) {
    out.push(mark);
    match line.strip_suffix('\n') {
        Some(body) => {
            out.push_str(body);
            out.push('\n');
        }
        None => {
            out.push_str(line);
            out.push_str("\n\\ No newline at end of file\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs<'a>(old: &'a str, new: &'a str) -> Vec<(&'a str, &'a str)> {
        let o: Vec<&str> = old.split_inclusive('\n').collect();
        let n: Vec<&str> = new.split_inclusive('\n').collect();
        assert_eq!(o.len(), n.len());
        o.into_iter().zip(n).collect()
    }

    #[test]
    fn no_change_no_diff() {
        assert_eq!(unified("a", "b", &pairs("x\ny\n", "x\ny\n")), "");
    }

    #[test]
    fn hunks_and_context() {
        let old: String = (1..=20).map(|i| format!("l{i}\n")).collect();
        let new = old.replace("l2\n", "L2\n").replace("l9\n", "L9\n").replace("l18\n", "L18\n").replace("l19\n", "L19\n");
        let d = unified("a/f", "b/f", &pairs(&old, &new));
        let expected = "--- a/f\n+++ b/f\n@@ -1,12 +1,12 @@\n l1\n-l2\n+L2\n l3\n l4\n l5\n l6\n l7\n l8\n-l9\n+L9\n l10\n l11\n l12\n@@ -15,6 +15,6 @@\n l15\n l16\n l17\n-l18\n-l19\n+L18\n+L19\n l20\n";
        assert_eq!(d, expected);
        // Seven unchanged lines between changes: two hunks (what diff -u does).
        let new2 = old.replace("l2\n", "L2\n").replace("l10\n", "L10\n");
        assert_eq!(unified("a", "b", &pairs(&old, &new2)).matches("@@ -").count(), 2);
        let new3 = old.replace("l2\n", "L2\n").replace("l9\n", "L9\n");
        assert_eq!(unified("a", "b", &pairs(&old, &new3)).matches("@@ -").count(), 1);
    }

    #[test]
    fn last_line_without_newline() {
        let d = unified("a", "b", &pairs("x\ny", "x\nz"));
        assert_eq!(d, "--- a\n+++ b\n@@ -1,2 +1,2 @@\n x\n-y\n\\ No newline at end of file\n+z\n\\ No newline at end of file\n");
        let d = unified("a", "b", &pairs("y\nx", "z\nx"));
        assert_eq!(d, "--- a\n+++ b\n@@ -1,2 +1,2 @@\n-y\n+z\n x\n\\ No newline at end of file\n");
        let d = unified("a", "b", &pairs("y\n", "z\n"));
        assert_eq!(d, "--- a\n+++ b\n@@ -1 +1 @@\n-y\n+z\n");
    }
}
