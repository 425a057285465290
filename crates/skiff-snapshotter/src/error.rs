use thiserror::Error;

/// What a snapshots call can fail with; each kind maps to the gRPC code
/// containerd turns back into its own error (errdefs).
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the snapshotter's metadata is damaged: {0}")]
    Corrupt(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] skiff_agent::AgentError),
}

impl SnapshotError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> tonic::Status {
        // The whole chain: containerd shows only this message.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        match e {
            SnapshotError::NotFound(_) => tonic::Status::not_found(message),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(message),
            SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            SnapshotError::Corrupt(_) | SnapshotError::Io { .. } | SnapshotError::Agent(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
