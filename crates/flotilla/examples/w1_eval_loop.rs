//! The W1 model evaluated on 10,000 synthetic images, for profilers: the engine's `evaluate`
//! (fixed chunks of 100, all cores) that `flotilla simulate` runs after every round.
//!
//! ```text
//! cargo run --release --example w1_eval_loop [SAMPLES]
//! ```
//! (default 10,000; prints the samples/s of three runs and the accuracy and loss, which are
//! the same every run.)

use flotilla::engine::local::evaluate;
use flotilla::models::{ModelSpec, Net, View};
use flotilla::workloads::client_data;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let samples: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let data = client_data(samples, 3);
    let view = View::full();
    let mut runs = Vec::new();
    let mut result = (0.0, 0.0);
    for _ in 0..3 {
        let t = Instant::now();
        result = evaluate(&spec, &view, &params, &data.train, &data.mean, &data.std)?;
        runs.push(format!("{:.0}", samples as f64 / t.elapsed().as_secs_f64()));
    }
    println!(
        "W1 evaluation of {samples}: {} samples/s (accuracy {:.4}, loss {:.4})",
        runs.join(" / "),
        result.0,
        result.1
    );
    Ok(())
}
