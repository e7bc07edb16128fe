//! One W1 client training on synthetic images, for profilers: the loop `flotilla bench` times,
//! without the rest of the bench around it.
//!
//! ```text
//! cargo run --release --example w1_train_loop [BATCH] [SAMPLES] [THREADS]
//! ```
//! (defaults 32, 3200 and all cores; prints the samples/s of three runs.)

use flotilla::engine::local::{CrossEntropy, TrainJob};
use flotilla::models::{ModelSpec, Net, View};
use flotilla::workloads::{client_data, w1_recipe};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let samples: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3200);
    let threads: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or_else(rayon::current_num_threads);
    let recipe = w1_recipe(batch);
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let view = View::full();
        let ce = CrossEntropy::under(&view);
        let warm = client_data(batch, 1);
        TrainJob::new(&spec, &view, &params, &warm, &recipe, &ce).train()?;
        let data = client_data(samples, 2);
        let job = TrainJob::new(&spec, &view, &params, &data, &recipe, &ce);
        let runs: Vec<String> = (0..3)
            .map(|_| {
                let t = Instant::now();
                job.train()?;
                Ok(format!("{:.0}", samples as f64 / t.elapsed().as_secs_f64()))
            })
            .collect::<Result<_, Box<dyn std::error::Error + Send + Sync>>>()?;
        println!(
            "W1 batch {batch}, {threads} thread(s): {} samples/s",
            runs.join(" / ")
        );
        Ok(())
    })
}
