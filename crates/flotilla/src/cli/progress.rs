//! Progress of a run: a bar on a terminal, plain log lines otherwise.

use flotilla_engine::EngineError;
use flotilla_engine::sink::{ClientStatus, Event, Sink};
use std::io::IsTerminal;

/// Progress: a bar on a terminal, plain log lines otherwise.
#[derive(Default)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// A display that starts with the run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Finishes the bar, if there is one.
    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Sink for Progress {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), EngineError> {
        match event {
            Event::Started {
                first_round,
                rounds,
            } => {
                if std::io::stderr().is_terminal() {
                    let bar = indicatif::ProgressBar::new(*rounds);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} round {pos}/{len} [{bar:30}] {msg} ETA {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_position(first_round - 1);
                    self.bar = Some(bar);
                } else {
                    tracing::info!(first_round, rounds, "run started");
                }
            }
            Event::Round { round, clients } => {
                let acc = round
                    .test_accuracy
                    .map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
                match &self.bar {
                    Some(b) => {
                        b.set_message(format!("acc {acc}"));
                        b.set_position(round.round);
                    }
                    None => tracing::info!(
                        round = round.round,
                        accuracy = %acc,
                        clients = round.clients,
                        skipped = clients.iter().filter(|c| c.status != ClientStatus::Ok).count(),
                        wall_s = format!("{:.1}", round.wall_time_s),
                        "round finished"
                    ),
                }
            }
            Event::Checkpoint { round } => tracing::debug!(round, "checkpoint written"),
            Event::Finished { .. } => {}
        }
        Ok(())
    }
}
