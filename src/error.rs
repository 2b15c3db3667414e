//! Errors: what a user can cause (exit code 2, one line naming the key or file) versus what
//! went wrong inside kiln or its collectives.

use std::path::Path;

/// Every error kiln reports. User errors print one line and exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum KilnError {
    /// A config key has a bad value, type or combination. The message names the key.
    #[error("config: {0}")]
    Config(String),
    /// A file the user named is missing, unreadable or malformed. The message names the file.
    #[error("{path}: {msg}")]
    File {
        /// The offending path, as the user gave it.
        path: String,
        /// What was expected.
        msg: String,
    },
    /// A collective failed or the ranks disagreed (see `comm.verify`).
    #[error("comm: {0}")]
    Comm(String),
    /// An error that another rank prints (rank 0, for errors every rank hits the same way); this
    /// rank exits with the code silently, so the user sees the line once.
    #[error("")]
    ReportedByAnotherRank(i32),
    /// A stop signal ended the run after `step` (rank 0 has logged it and where the checkpoint
    /// is); the process exits with [`crate::signals::EXIT_STOPPED`] and prints nothing more.
    #[error("stopped by a signal after step {step}")]
    Stopped {
        /// The step reached.
        step: u64,
    },
    /// The filesystem holding a file kiln writes is full (ENOSPC) or over quota (EDQUOT): the
    /// user's environment, not a fault of kiln's, so exit code 2 like other user errors.
    #[error("{path}: {source}")]
    NoSpace {
        /// The file being written.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint could not be saved; its partial files were removed, and the previous
    /// checkpoint and `latest` are as they were.
    #[error("checkpoint of step {step} not saved: {cause}; {kept}")]
    CheckpointNotSaved {
        /// The step it was for.
        step: u64,
        /// Why.
        cause: Box<KilnError>,
        /// What `latest` still names.
        kept: String,
    },
    /// An I/O failure on a path kiln chose (outputs, offload files).
    #[error("{path}: {source}")]
    Io {
        /// Path being read or written.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl KilnError {
    /// Shorthand for a config error.
    pub fn config(msg: impl Into<String>) -> Self {
        KilnError::Config(msg.into())
    }

    /// Shorthand for a file error.
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        KilnError::File {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }

    /// Wraps an I/O error with the path it concerns (a full disk or quota is `NoSpace`).
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        let path = path.as_ref().display().to_string();
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => KilnError::NoSpace { path, source },
            _ => KilnError::Io { path, source },
        }
    }

    /// Process exit code: 2 for anything the user can fix, 75 for a stop by a signal, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            KilnError::Config(_) | KilnError::File { .. } | KilnError::NoSpace { .. } => 2,
            KilnError::CheckpointNotSaved { cause, .. } => cause.exit_code(),
            KilnError::ReportedByAnotherRank(code) => *code,
            KilnError::Stopped { .. } => crate::signals::EXIT_STOPPED,
            KilnError::Comm(_) | KilnError::Io { .. } => 1,
        }
    }
}

/// kiln's result type.
pub type Result<T> = std::result::Result<T, KilnError>;
