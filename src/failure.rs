//! What an error means for the work that met it: try again, give up on this piece of
//! work, or stop. The worker and the planner decide by this classification, never by
//! an error's text.

use std::fmt;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Trying again cannot help: the data (or this piece of work) is wrong. The work is
    /// failed (its records settled as failed) or dead-lettered; never requeued forever.
    Permanent,
    /// A dependency failed for now (connection lost, timeout, lock conflict, shutdown):
    /// try the same work again later.
    Transient,
    /// The installation is wrong (credentials, privileges, a missing table, a setting):
    /// no work can succeed until someone fixes it. Stop, saying what to fix.
    Fatal,
}

impl Failure {
    /// Classifies a database error.
    ///
    /// * permanent: values that cannot be decoded or encoded, a row or column that is
    ///   not there, data exceptions (SQLSTATE class 22) and integrity constraint
    ///   violations (class 23);
    /// * fatal: configuration and migration errors, TLS set-up, refused credentials
    ///   (class 28), an unknown database (`3D000`), missing privileges (`42501`), a
    ///   missing table or column (`42P01`, `42703`: migrations not applied);
    /// * transient: everything else: I/O, the pool, the protocol, serialization
    ///   failures and deadlocks (class 40), lock and statement timeouts (`55P03`,
    ///   `57014`), shutdowns (class 57), exhausted resources (class 53), connections
    ///   (class 08).
    pub fn of_sqlx(e: &sqlx::Error) -> Failure {
        use sqlx::Error as E;
        match e {
            E::ColumnDecode { .. }
            | E::Decode(_)
            | E::Encode(_)
            | E::TypeNotFound { .. }
            | E::ColumnNotFound(_)
            | E::ColumnIndexOutOfBounds { .. }
            | E::RowNotFound => Failure::Permanent,
            E::Configuration(_) | E::Migrate(_) | E::Tls(_) | E::InvalidArgument(_) => {
                Failure::Fatal
            }
            E::Database(db) => match db.code() {
                Some(code) => Failure::of_sqlstate(&code),
                None => Failure::Transient,
            },
            _ => Failure::Transient,
        }
    }

    /// Classifies a PostgreSQL SQLSTATE (see [`Failure::of_sqlx`]).
    pub fn of_sqlstate(code: &str) -> Failure {
        match code {
            "3D000" | "42501" | "42P01" | "42703" => Failure::Fatal,
            _ if code.starts_with("28") => Failure::Fatal,
            _ if code.starts_with("22") || code.starts_with("23") => Failure::Permanent,
            _ => Failure::Transient,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Permanent => "permanent",
            Failure::Transient => "transient",
            Failure::Fatal => "fatal",
        }
    }
}

/// An error type that says what it means for the work that met it.
pub trait Classify {
    fn failure(&self) -> Failure;
}

impl Classify for sqlx::Error {
    fn failure(&self) -> Failure {
        Failure::of_sqlx(self)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Db(&'static str);
    impl fmt::Display for Db {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }
    impl std::error::Error for Db {}
    impl sqlx::error::DatabaseError for Db {
        fn message(&self) -> &str {
            "a test error"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn db(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Db(code)))
    }

    #[test]
    fn every_sqlx_error_kind_says_what_to_do() {
        use Failure::*;
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let cases: Vec<(&str, sqlx::Error, Failure)> = vec![
            ("decode", sqlx::Error::Decode("bad".into()), Permanent),
            (
                "column decode",
                sqlx::Error::ColumnDecode {
                    index: "0".into(),
                    source: "infinity".into(),
                },
                Permanent,
            ),
            ("encode", sqlx::Error::Encode("bad".into()), Permanent),
            (
                "type not found",
                sqlx::Error::TypeNotFound {
                    type_name: "x".into(),
                },
                Permanent,
            ),
            (
                "column not found",
                sqlx::Error::ColumnNotFound("x".into()),
                Permanent,
            ),
            (
                "column index",
                sqlx::Error::ColumnIndexOutOfBounds { index: 9, len: 2 },
                Permanent,
            ),
            ("row not found", sqlx::Error::RowNotFound, Permanent),
            ("data exception", db("22021"), Permanent),
            ("numeric out of range", db("22003"), Permanent),
            ("unique violation", db("23505"), Permanent),
            ("check violation", db("23514"), Permanent),
            (
                "configuration",
                sqlx::Error::Configuration("bad url".into()),
                Fatal,
            ),
            ("tls", sqlx::Error::Tls("no CA".into()), Fatal),
            (
                "invalid argument",
                sqlx::Error::InvalidArgument("x".into()),
                Fatal,
            ),
            ("bad password", db("28P01"), Fatal),
            ("no such database", db("3D000"), Fatal),
            ("no privilege", db("42501"), Fatal),
            ("no table", db("42P01"), Fatal),
            ("no column", db("42703"), Fatal),
            ("io", sqlx::Error::Io(io()), Transient),
            ("pool timed out", sqlx::Error::PoolTimedOut, Transient),
            ("pool closed", sqlx::Error::PoolClosed, Transient),
            ("worker crashed", sqlx::Error::WorkerCrashed, Transient),
            ("protocol", sqlx::Error::Protocol("eof".into()), Transient),
            ("serialization", db("40001"), Transient),
            ("deadlock", db("40P01"), Transient),
            ("lock timeout", db("55P03"), Transient),
            ("statement timeout", db("57014"), Transient),
            ("admin shutdown", db("57P01"), Transient),
            ("too many connections", db("53300"), Transient),
            ("connection failure", db("08006"), Transient),
        ];
        for (what, e, want) in cases {
            assert_eq!(Failure::of_sqlx(&e), want, "{what}: {e}");
            assert_eq!(e.failure(), want, "{what} (Classify)");
        }
    }
}
