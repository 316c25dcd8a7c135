//! `cargo xtask bench controlplane`: how fast the test control plane starts,
//! installs the CRDs and accepts AuthPolicy objects.

use std::time::Instant;

use anyhow::{Result, bail};
use tessera_tests::{ControlPlane, resources};

use crate::report::{Figure, ms, percentile};

/// Control-plane start time, CRD install time, and custom-resource create latency.
pub async fn run() -> Result<Vec<Figure>> {
    const STARTS: usize = 3;
    const CREATES: usize = 300;
    let mut starts = Vec::new();
    let mut last = None;
    for i in 0..STARTS {
        let t = Instant::now();
        let cp = ControlPlane::start().await?;
        starts.push(t.elapsed());
        println!("start {}: {:.2}s", i + 1, t.elapsed().as_secs_f64());
        last = Some(cp);
    }
    starts.sort();
    let Some(cp) = last else {
        bail!("no control plane started");
    };
    let client = cp.client().await?;

    let t = Instant::now();
    resources::install_crds(&client, &tessera_api::crd::all()).await?;
    let install = t.elapsed();

    let mut latencies = Vec::with_capacity(CREATES);
    for i in 0..CREATES {
        let yaml = format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthPolicy\nmetadata:\n  name: bench-{i}\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: bench-{i}\n  rules:\n  - from:\n    - namespaces: [default]\n    ports:\n    - port: 8080\n"
        );
        let obj = resources::parse_manifest(&yaml)?.remove(0);
        let t = Instant::now();
        resources::create(&client, &obj, false).await?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    Ok(vec![
        Figure::new(
            "controlplane_start_p50",
            percentile(&starts, 50.0).as_secs_f64(),
            "s",
        ),
        Figure::new(
            "controlplane_start_max",
            percentile(&starts, 100.0).as_secs_f64(),
            "s",
        ),
        Figure::new("crd_install_established", ms(install), "ms"),
        Figure::new(
            "authpolicy_create_p50",
            ms(percentile(&latencies, 50.0)),
            "ms",
        ),
        Figure::new(
            "authpolicy_create_p99",
            ms(percentile(&latencies, 99.0)),
            "ms",
        ),
    ])
}
