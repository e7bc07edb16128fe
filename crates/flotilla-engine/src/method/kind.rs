//! The kind of a task.

/// What a task asks of its client. [`TaskKind::TRAIN`] is the kind every method's client
/// half understands; a method with several kinds of task (FeDLRT's basis gradients, core
/// gradients and core training) names its own with [`TaskKind::named`]. It travels, and is
/// compared with plain strings, as its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKind(std::borrow::Cow<'static, str>);

impl TaskKind {
    /// Local training of the tensors the view leaves trainable.
    pub const TRAIN: TaskKind = TaskKind::named("train");

    /// A method's own kind of task.
    pub const fn named(name: &'static str) -> Self {
        Self(std::borrow::Cow::Borrowed(name))
    }

    /// The name, as it travels.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for TaskKind {
    fn from(name: &str) -> Self {
        Self(std::borrow::Cow::Owned(name.to_string()))
    }
}

impl From<String> for TaskKind {
    fn from(name: String) -> Self {
        Self(std::borrow::Cow::Owned(name))
    }
}

impl PartialEq<&str> for TaskKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
