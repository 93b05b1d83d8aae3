//! Hiding credentials in text meant for people: URLs (database, broker, API) and free
//! text (library errors that may quote one). Used wherever a URL or a library's error is
//! printed, logged or stored: `cli`, `db`, `check`, the broker and the analytics client.

/// A URL fit to print: the password of its user info and the value of every
/// credential-like query parameter become `***`. A libpq key/value string has its
/// credential values hidden the same way; any other text that is not a URL is hidden whole.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| is_credential_key(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if is_credential_key(&k) {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) if raw.contains('=') && !raw.contains("://") => redact_key_values(raw),
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// `host=db password='a b' user=x` → `host=db password=*** user=x`.
fn redact_key_values(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        // The key is the last word before '='.
        let key = before
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or_default()
            .trim();
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        // The value: a quoted string (with \' escapes) or up to the next whitespace.
        let end = if let Some(quoted) = after.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(after.len(), |(i, _)| i + 2)
        } else {
            after.find(char::is_whitespace).unwrap_or(after.len())
        };
        if is_credential_key(key) {
            out.push_str("***");
        } else {
            out.push_str(&after[..end]);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Free text (an error message, a log line) with every URL in it passed through
/// [`redact_url`] and every `password=…`-like pair hidden, for text that came from a
/// library and may quote a URL.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // Back to the start of the scheme.
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |j| j + 1);
        let end = i + rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '<' | '>' | '`' | ')'))
            .unwrap_or(rest.len() - i);
        out.push_str(&redact_key_values(&rest[..start]));
        if start == i {
            // "://" without a scheme: not a URL, hide what follows up to the separator.
            out.push_str("<hidden>");
        } else {
            out.push_str(&redact_url(&rest[start..end]));
        }
        rest = &rest[end..];
    }
    out.push_str(&redact_key_values(rest));
    out
}

/// Query parameters and key/value pairs whose value is hidden: `password`, `passwd`,
/// `pwd`, `sslpassword`, `token`, `key`, `secret`, `api_key`, … (any case, any name
/// containing one of these words).
fn is_credential_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| k.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_form_is_redacted() {
        let cases = [
            (
                "postgres://app:hunter2@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            (
                "postgresql://app:hunter2@db/x?sslmode=verify-full",
                "postgresql://app:***@db/x?sslmode=verify-full",
            ),
            (
                "postgres://app@db/x?password=hunter2&sslmode=require",
                "postgres://app@db/x?password=***&sslmode=require",
            ),
            (
                "postgres://db/x?user=app&PassWord=hunter2",
                "postgres://db/x?user=app&PassWord=***",
            ),
            (
                "postgres://db/x?sslpassword=hunter2",
                "postgres://db/x?sslpassword=***",
            ),
            (
                "postgres://db/x?passwd=hunter2",
                "postgres://db/x?passwd=***",
            ),
            ("postgres://db/x?pwd=hunter2", "postgres://db/x?pwd=***"),
            (
                "amqp://guest:hunter2@h:5672/%2f",
                "amqp://guest:***@h:5672/%2f",
            ),
            (
                "amqps://loansync:hunter2@h/%2f?heartbeat=30",
                "amqps://loansync:***@h/%2f?heartbeat=30",
            ),
            ("amqp://guest@h:5672/%2f", "amqp://guest@h:5672/%2f"),
            (
                "https://u:hunter2@api.example.com/v1",
                "https://u:***@api.example.com/v1",
            ),
            (
                "http://api.example.com/v1?key=hunter2&page=2",
                "http://api.example.com/v1?key=***&page=2",
            ),
            (
                "https://api.example.com/?token=hunter2&API_KEY=hunter2&secret=hunter2&access_token=hunter2",
                "https://api.example.com/?token=***&API_KEY=***&secret=***&access_token=***",
            ),
            (
                "host=db user=app password=hunter2 dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            (
                "host=db password='hunter2 with \\' quote' sslmode=verify-full",
                "host=db password=*** sslmode=verify-full",
            ),
            ("postgres://u:hunter2@[::1", "<unparseable url>"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact_url(raw), want, "{raw}");
            assert!(!redact_url(raw).contains("hunter2"));
        }
    }

    #[test]
    fn urls_inside_text_are_redacted() {
        let text = "error sending request for url (http://api.example.com/loans?key=hunter2): \
                    tried amqp://guest:hunter2@h/%2f and 'postgres://u:hunter2@db/x', password=hunter2";
        let r = redact_text(text);
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("http://api.example.com/loans?key=***)"), "{r}");
        assert!(r.contains("amqp://guest:***@h/%2f and"), "{r}");
        assert!(r.contains("'postgres://u:***@db/x'"), "{r}");
        assert!(r.ends_with("password=***"), "{r}");
        assert_eq!(redact_text("no url here"), "no url here");
    }
}
