//! What a configuration check found: every error and warning at once, so an
//! operator fixes a file in one round instead of one error per try.

/// Errors make a config unusable; warnings are legal but probably not meant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Findings {
    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    pub fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The errors as one line (for callers that report a single message).
    pub fn into_result(self) -> Result<(), String> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors.join("; "))
        }
    }
}

/// One message per repeated item of `items`, as `key[i]: 'x' is listed twice`.
pub fn duplicates<T: PartialEq + std::fmt::Display>(key: &str, items: &[T]) -> Vec<String> {
    items
        .iter()
        .enumerate()
        .filter(|(i, item)| items[..*i].contains(item))
        .map(|(i, item)| format!("{key}[{i}]: '{item}' is listed twice"))
        .collect()
}
