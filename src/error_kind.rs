//! What kind of failure an error is, decided where it is raised: the HTTP
//! layer maps kinds to statuses and never looks at a backend's variants.

/// How a caller should read a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong.
    Invalid,
    NotFound,
    /// The request conflicts with what is stored or running.
    Conflict,
    /// At capacity now; worth a retry shortly.
    Busy,
    /// A part the request needs cannot be reached now; worth a retry.
    Unavailable,
    /// A bug or a failing disk.
    Internal,
}
