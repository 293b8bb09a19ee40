//! How errors and warnings reach the terminal: one line each, whatever `RUST_BACKTRACE` says.

/// The one-line text of `e`: its chain of causes joined by `: `, each cause on one line.
/// candle puts an error's context on a line of its own, and a backtrace where one was
/// captured; both are folded here (a backtrace left out), so a user sees
/// `error: <what>: <why>` and nothing more. (`main` turns library backtraces off first, since a
/// backtrace formatted into another error's message can no longer be told apart.)
/// `RUST_LOG=debug` logs the full chain.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<candle_core::Error>() {
            Some(c) => candle_line(c),
            None => cause.to_string(),
        };
        let text = flatten(&text);
        // anyhow's chain repeats a cause that an outer error also prints in its own text
        // (a candle `Wrapped` error, thiserror's `transparent`): keep each text once.
        if !parts.iter().any(|p| p.ends_with(&text)) && !text.is_empty() {
            parts.push(text);
        }
        if cause.downcast_ref::<candle_core::Error>().is_some() {
            // candle's Display already includes what it wraps.
            break;
        }
    }
    parts.join(": ")
}

/// A candle error without its backtrace, its context and path on the same line.
fn candle_line(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_line(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_line(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_line(inner)),
        other => other.to_string(),
    }
}

/// `text` with its lines joined by `; `, blank ones dropped.
fn flatten(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_backtraces_and_contexts_fold_into_one_line() {
        let inner = candle_core::Error::Msg("shape mismatch".into());
        let with_bt = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let ctx = with_bt.context("loading model.safetensors");
        let e = anyhow::Error::new(ctx).context("ddpm sample");
        assert_eq!(
            one_line(&e),
            "ddpm sample: loading model.safetensors: shape mismatch"
        );
        let plain = anyhow::anyhow!("two\nlines").context("outer");
        assert_eq!(one_line(&plain), "outer: two; lines");
    }
}
