//! The library's error type. Two kinds, because the CLI maps them to different exit
//! codes (README.md, "Exit codes"): bad input from the user (2) and a failure of an engine (3).

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Usage or bad input: a clear one-line message, exit code 2.
    #[error("{0}")]
    Input(String),
    /// An engine failed while computing; whatever it dumped is kept. Exit code 3.
    #[error("{0}")]
    Engine(String),
}

impl Error {
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub fn engine(msg: impl Into<String>) -> Self {
        Error::Engine(msg.into())
    }

    /// Bad input in the file `path` that the option `flag` named, with the option in
    /// front (`--prompts suite.jsonl:3: …`), so the user knows which argument to fix.
    /// Engine failures are left as they are.
    pub fn for_option(self, flag: &str, path: &std::path::Path) -> Self {
        match self {
            Error::Input(msg) => {
                let shown = path.display().to_string();
                if msg.starts_with(&shown) {
                    Error::Input(format!("{flag} {msg}"))
                } else {
                    Error::Input(format!("{flag} {shown}: {msg}"))
                }
            }
            engine => engine,
        }
    }

    /// For I/O on paths the user named: always reported with the path, and the common
    /// kinds in words rather than as an OS error number.
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        use std::io::ErrorKind;
        let what = match err.kind() {
            ErrorKind::NotFound => "no such file or directory".to_string(),
            ErrorKind::IsADirectory => "a directory, not a file".to_string(),
            ErrorKind::NotADirectory => "a part of the path is a file, not a directory".to_string(),
            ErrorKind::AlreadyExists => "already exists".to_string(),
            ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => err.to_string(),
        };
        Error::Input(format!("{}: {what}", path.display()))
    }
}

/// A breach of the tap contract (an unknown tap, a bad selection) is bad input.
impl From<resbisect_taps::Error> for Error {
    fn from(e: resbisect_taps::Error) -> Self {
        Error::Input(e.0)
    }
}
