//! Progress bars (drawn only on a terminal) and human-readable sizes.

use indicatif::{ProgressBar, ProgressStyle};
use skiff_client::TransferProgress;
use skiff_oci::ConvertProgress;

pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A bar over `total` bytes; hidden when stderr is not a terminal.
pub fn bytes_bar(prefix: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

pub struct ConvertBar {
    bar: ProgressBar,
}

impl ConvertBar {
    pub fn new(prefix: String) -> Self {
        ConvertBar {
            bar: bytes_bar(&prefix, 0),
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl ConvertProgress for ConvertBar {
    fn start(&self, total_bytes: u64) {
        self.bar.set_length(total_bytes);
    }

    fn layer(&self, index: usize, count: usize) {
        self.bar.set_message(format!("layer {}/{count}", index + 1));
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
}

/// A bar over the bytes a push or pull sends.
pub struct TransferBar {
    pub bar: ProgressBar,
}

impl TransferBar {
    pub fn new(prefix: &str) -> Self {
        TransferBar {
            bar: bytes_bar(prefix, 0),
        }
    }
}

impl TransferProgress for TransferBar {
    fn start(&self, chunks: u64, bytes: u64) {
        // Once for each image of an attach.
        self.bar.set_position(0);
        self.bar.set_length(bytes);
        self.bar.set_message(format!("{chunks} chunks"));
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
}
