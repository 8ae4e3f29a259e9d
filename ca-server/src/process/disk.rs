//! Failed writes of the files meshca keeps on local disk — the committed state (file store), the
//! bundle file, the issuance ledger — as the operator sees them: a log line when a file starts or
//! stops failing, `meshca_disk_write_failures_total{file}`, and a line in `/readyz`'s answer while
//! a file is failing. A failed output write (bundle, ledger) never unwinds a committed
//! transition: it is retried by the ledger writer's tick until it succeeds.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The files whose writes are tracked, as `file` label values.
pub const FILES: [&str; 3] = ["state", "bundle", "ledger"];

/// `meshca_disk_write_failures_total{file}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    /// `state` (state.json and the key files of a commit), `bundle` or `ledger`.
    pub file: &'static str,
}

/// Which local files are failing to be written, and how often they failed.
#[derive(Debug)]
pub struct DiskWrites {
    failures: Family<FileLabels, Counter>,
    failing: Mutex<BTreeMap<&'static str, String>>,
}

impl Default for DiskWrites {
    fn default() -> Self {
        let failures = Family::<FileLabels, Counter>::default();
        for file in FILES {
            failures.get_or_create(&FileLabels { file }).inc_by(0);
        }
        Self {
            failures,
            failing: Mutex::default(),
        }
    }
}

impl DiskWrites {
    /// Records a failed write of `file`. Logged at error level when the file starts failing or
    /// the reason changes (a retry every second of the same ENOSPC logs once).
    pub fn failed(&self, file: &'static str, error: &dyn std::fmt::Display) {
        self.failures.get_or_create(&FileLabels { file }).inc();
        let text = error.to_string();
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if failing.get(file) != Some(&text) {
            tracing::error!(file, "local write failed, will retry: {text}");
        }
        failing.insert(file, text);
    }

    /// Records a successful write of `file` (logs when it had been failing).
    pub fn ok(&self, file: &'static str) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if failing.remove(file).is_some() {
            tracing::warn!(file, "local write succeeded again");
        }
    }

    /// Whether `file` is failing now.
    pub fn is_failing(&self, file: &'static str) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(file)
    }

    /// The files failing now, with their last error: `"bundle: <error>; ledger: <error>"`.
    pub fn describe(&self) -> Option<String> {
        let failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        (!failing.is_empty()).then(|| {
            failing
                .iter()
                .map(|(f, e)| format!("cannot write {f}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// The counter family, for the metrics registry.
    pub fn counter(&self) -> Family<FileLabels, Counter> {
        self.failures.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_files_are_listed_until_they_are_written_again() {
        let d = DiskWrites::default();
        assert_eq!(d.describe(), None);
        d.failed("bundle", &"No space left on device (os error 28)");
        d.failed("bundle", &"No space left on device (os error 28)");
        assert!(d.is_failing("bundle"));
        assert_eq!(
            d.describe().as_deref(),
            Some("cannot write bundle: No space left on device (os error 28)")
        );
        assert_eq!(
            d.counter()
                .get_or_create(&FileLabels { file: "bundle" })
                .get(),
            2
        );
        d.ok("bundle");
        assert!(!d.is_failing("bundle"));
        assert_eq!(d.describe(), None);
    }
}
