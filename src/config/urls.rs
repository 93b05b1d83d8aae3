//! The checks of the URLs the settings hold, at start-up: `DATABASE_URL` as sqlx reads it,
//! `AMQP_URL` as lapin reads it, and which hosts are loopback (where the analytics API
//! may be plain `http://`). Their errors never hold a password.

use crate::redact::{redact_text, redact_url};

/// `ANALYTICS_API_URL`, without its trailing slashes: `http://` or `https://`, and plain
/// `http://` only to a loopback host unless `allow_plaintext`. The error shows the URL
/// redacted.
pub(super) fn check_api_url(raw: &str, allow_plaintext: bool) -> Result<url::Url, String> {
    let base_url =
        url::Url::parse(raw.trim().trim_end_matches('/')).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(base_url.scheme(), "http" | "https") {
        return Err("must be http:// or https://".into());
    }
    if base_url.scheme() == "http" && !is_loopback(&base_url) && !allow_plaintext {
        return Err(format!(
            "{} is plain http:// to a host that is not loopback: the API key and every record \
             would cross the network unencrypted. Use https://, or set ANALYTICS_ALLOW_PLAINTEXT=true \
             if the network itself is trusted",
            redact_url(base_url.as_str())
        ));
    }
    Ok(base_url)
}

/// A host that never leaves the machine: 127.0.0.0/8, ::1, `localhost`.
fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The query parameters sqlx's PostgreSQL driver understands. It ignores any other, with a
/// log line that prints the value: a misspelt `sslmode` would silently leave TLS off, and a
/// libpq-only `sslpassword` would be logged. Both are refused instead.
const PG_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `DATABASE_URL` as sqlx will read it: the URL form only (sqlx does not take libpq's
/// `host=… password=…` strings), known parameters only. The error never holds the password.
pub(super) fn check_database_url(raw: &str) -> Result<(), String> {
    const FORM: &str =
        "postgres://USER:PASSWORD@HOST:5432/DBNAME?sslmode=verify-full&sslrootcert=/path/to/ca.pem";
    let u = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(_) if raw.contains('=') && !raw.contains("://") => {
            return Err(format!(
                "this looks like a libpq key/value string; loansync's driver takes the URL form only: {FORM}"
            ));
        }
        Err(e) => return Err(format!("not a URL ({e}); expected {FORM}")),
    };
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "the scheme is {:?}; expected postgres:// or postgresql://",
            u.scheme()
        ));
    }
    for (k, v) in u.query_pairs() {
        // The CA file is read when connecting: check it now, like ANALYTICS_CA_FILE.
        if matches!(k.as_ref(), "sslrootcert" | "ssl-root-cert" | "ssl-ca") {
            crate::tls::read_ca_pem(&v).map_err(|e| format!("{k}: {e}"))?;
        }
        let known =
            PG_PARAMETERS.contains(&k.as_ref()) || (k.starts_with("options[") && k.ends_with(']'));
        if !known {
            return Err(format!(
                "unknown parameter {k:?} (the driver would ignore it); known: {}",
                PG_PARAMETERS.join(", ")
            ));
        }
    }
    <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(raw)
        .map(drop)
        .map_err(|e| redact_text(&e.to_string()))
}

/// `AMQP_URL` as lapin will read it. The error never holds the password (lapin's own
/// error for a URL without `//` quotes the whole URL, so that case is caught first).
pub(super) fn check_amqp_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "amqp://USER:PASSWORD@HOST:5672/VHOST (or amqps://)";
    let u = url::Url::parse(raw).map_err(|e| format!("not a URL ({e}); expected {FORM}"))?;
    if u.cannot_be_a_base() || !u.has_host() {
        return Err(format!("not a URL with a host; expected {FORM}"));
    }
    if !matches!(u.scheme(), "amqp" | "amqps") {
        return Err(format!("the scheme is {:?}; expected {FORM}", u.scheme()));
    }
    raw.parse::<lapin::uri::AMQPUri>()
        .map(drop)
        .map_err(|e| redact_text(&e))
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::settings;

    #[test]
    fn plain_http_to_a_remote_host_needs_the_allow_variable() {
        for local in [
            "http://127.0.0.1:8088",
            "http://127.1.2.3",
            "http://localhost:8088/api",
            "http://LOCALHOST",
            "http://[::1]:8088",
            "https://analytics.example.com",
            "https://10.0.0.5",
        ] {
            settings(&[("ANALYTICS_API_URL", local)]).unwrap_or_else(|e| panic!("{local}: {e}"));
        }
        for remote in [
            "http://stub:8088",
            "http://10.0.0.5",
            "http://analytics.example.com",
            "http://[2001:db8::1]",
            "http://localhost.example.com",
            "http://user:hunter2@analytics.example.com",
        ] {
            let err = settings(&[("ANALYTICS_API_URL", remote)])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("ANALYTICS_API_URL: "), "{err}");
            assert!(err.contains("ANALYTICS_ALLOW_PLAINTEXT=true"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            let s = settings(&[
                ("ANALYTICS_API_URL", remote),
                ("ANALYTICS_ALLOW_PLAINTEXT", "true"),
            ])
            .unwrap();
            assert_eq!(s.api().unwrap().base_url.scheme(), "http");
            assert!(!format!("{s:?}").contains("hunter2"));
        }
        let err = settings(&[
            ("ANALYTICS_API_URL", "http://stub:8088"),
            ("ANALYTICS_ALLOW_PLAINTEXT", "false"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("ANALYTICS_ALLOW_PLAINTEXT"),
            "{err}"
        );
    }

    #[test]
    fn connection_strings_are_checked_at_start_up_without_echoing_the_password() {
        // libpq key/value strings are not taken by sqlx: refused with the URL form shown.
        let err = settings(&[("DATABASE_URL", "host=db user=app password=hunter2 dbname=x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key/value"), "{err}");
        assert!(err.contains("postgres://"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // A parameter sqlx would ignore (and log, value included) is refused.
        let err = settings(&[("DATABASE_URL", "postgres://u@db/x?sslpassword=hunter2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslpassword"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // What the deploy examples use is accepted, once the CA file is there.
        let example = "postgres://loansync:hunter2@postgres.lending.svc:5432/lending?sslmode=verify-full&sslrootcert=";
        let err = settings(&[(
            "DATABASE_URL",
            &format!("{example}/nonexistent/loansync/db-ca.pem"),
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("DATABASE_URL: sslrootcert: cannot read /nonexistent"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let path = std::env::temp_dir().join(format!("loansync-db-ca-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, ca).unwrap();
        settings(&[("DATABASE_URL", &format!("{example}{}", path.display()))]).unwrap();
        std::fs::remove_file(path).unwrap();
        settings(&[(
            "AMQP_URL",
            "amqps://loansync:hunter2@rabbitmq.messaging.svc:5671/%2f",
        )])
        .unwrap();
        let err = settings(&[("AMQP_URL", "amqp:hunter2")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("AMQP_URL: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
