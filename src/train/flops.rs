//! The floating-point operations of a training step, counted from what torch ran: the step runs
//! once under torch's profiler (with input shapes), and every matrix product, convolution and
//! attention op in its trace is counted with the standard formula (2 FLOPs per multiply-add) from
//! the shapes torch recorded. Autograd runs only what the step needs, so the count holds the
//! forward pass, the activation gradients back to the first layer that needs one, and the weight
//! gradients of the trained tensors alone (a frozen convolution's `convolution_backward` records
//! which of its gradients it computed). Element-wise ops (norms, activations, the optimizer's
//! update) are not counted: a few percent of a U-Net step. Ops nested inside a counted op (a
//! product inside an attention kernel) are not counted again.
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::HashMap;

/// FLOPs of one run of `step`, from torch's profiler trace of it.
pub fn count_flops(step: impl FnOnce() -> Result<()>) -> Result<f64> {
    let dir = tempfile::tempdir().context("creating a folder for the profiler's trace")?;
    let trace = dir.path().join("step.json");
    crate::util::profiler::profile(&trace, step)?;
    let text = std::fs::read_to_string(&trace)
        .with_context(|| format!("reading the profiler's trace {}", trace.display()))?;
    let parsed: Value = serde_json::from_str(&text).context("parsing the profiler's trace")?;
    Ok(flops_of_trace(&parsed))
}

/// One op of the trace.
struct Op<'a> {
    name: &'a str,
    thread: String,
    start: f64,
    end: f64,
    dims: Vec<Vec<f64>>,
    concrete: Vec<&'a str>,
}

/// The FLOPs of the counted ops of a Chrome trace (torch's `export_chrome_trace` format).
pub fn flops_of_trace(trace: &Value) -> f64 {
    let events = trace["traceEvents"].as_array().map_or(&[][..], |e| e);
    let mut ops: Vec<Op> = events
        .iter()
        .filter(|e| e["cat"] == "cpu_op")
        .filter_map(|e| {
            let start = e["ts"].as_f64()?;
            Some(Op {
                name: e["name"].as_str()?,
                thread: e["tid"].to_string(),
                start,
                end: start + e["dur"].as_f64().unwrap_or(0.0),
                dims: e["args"]["Input Dims"]
                    .as_array()
                    .map(|all| all.iter().map(dims).collect())
                    .unwrap_or_default(),
                concrete: e["args"]["Concrete Inputs"]
                    .as_array()
                    .map(|all| all.iter().map(|v| v.as_str().unwrap_or("")).collect())
                    .unwrap_or_default(),
            })
        })
        .collect();
    ops.sort_by(|a, b| a.start.total_cmp(&b.start));
    // The end of the last counted op on each thread: ops starting before it are inside it.
    let mut counted_until: HashMap<String, f64> = HashMap::new();
    let mut total = 0.0;
    for op in &ops {
        let Some(flops) = op_flops(op) else { continue };
        let until = counted_until.entry(op.thread.clone()).or_insert(f64::MIN);
        if op.start < *until {
            continue;
        }
        *until = op.end;
        total += flops;
    }
    total
}

fn dims(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .map(|d| d.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// The op's FLOPs when it is one that is counted.
fn op_flops(op: &Op) -> Option<f64> {
    let d = &op.dims;
    let at = |i: usize| d.get(i).filter(|v| !v.is_empty());
    match op.name {
        "aten::mm" => matmul(at(0)?, at(1)?),
        "aten::addmm" | "aten::baddbmm" => matmul(at(1)?, at(2)?),
        "aten::bmm" => matmul(at(0)?, at(1)?),
        "aten::convolution" => {
            let (input, weight) = (at(0)?, at(1)?);
            let list = |i: usize| parse_list(op.concrete.get(i)?);
            let (stride, padding, dilation) = (list(3)?, list(4)?, list(5)?);
            let output: Vec<f64> = (0..2)
                .map(|i| {
                    let k = weight[2 + i];
                    ((input[2 + i] + 2.0 * padding[i] - dilation[i] * (k - 1.0) - 1.0) / stride[i])
                        .floor()
                        + 1.0
                })
                .collect();
            Some(convolution(input[0], weight, output[0] * output[1]))
        }
        "aten::convolution_backward" => {
            let (grad_output, weight) = (at(0)?, at(2)?);
            let mask = op.concrete.last()?;
            let computed = mask
                .trim_matches(['[', ']'])
                .split(',')
                .take(2)
                .filter(|m| m.trim() == "True")
                .count();
            let once = convolution(grad_output[0], weight, grad_output[2] * grad_output[3]);
            Some(once * computed as f64)
        }
        name if name.starts_with("aten::_scaled_dot_product_") && name.contains("attention") => {
            let backward = name.ends_with("_backward");
            let first = usize::from(backward);
            let (q, k, v) = (at(first)?, at(first + 1)?, at(first + 2)?);
            if name.contains("_math") || q.len() < 2 {
                return None;
            }
            let heads: f64 = q[..q.len() - 2].iter().product();
            let (lq, lk) = (q[q.len() - 2], k[k.len() - 2]);
            let (dk, dv) = (q[q.len() - 1], v[v.len() - 1]);
            // Forward: Q Kᵀ and P V. Backward: dP = dO Vᵀ, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q.
            let forward = 2.0 * heads * lq * lk * (dk + dv);
            Some(if backward { 2.0 * forward } else { forward })
        }
        _ => None,
    }
}

/// `a [.., m, k] x b [.., k, n]`: 2 m k n per batch element (the batch of `a`).
fn matmul(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let batch: f64 = a[..a.len() - 2].iter().product();
    Some(2.0 * batch * a[a.len() - 2] * a[a.len() - 1] * b[b.len() - 1])
}

/// A convolution of `weight` `[out, in / groups, kh, kw]` over `batch` images with `pixels`
/// output positions each.
fn convolution(batch: f64, weight: &[f64], pixels: f64) -> f64 {
    2.0 * batch * pixels * weight.iter().product::<f64>()
}

/// `"[1, 2]"` as numbers.
fn parse_list(text: &str) -> Option<Vec<f64>> {
    text.trim_matches(['[', ']'])
        .split(',')
        .map(|v| v.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_product_counts_its_forward_and_the_gradients_it_needs() {
        let x = Tensor::randn([128, 8], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::randn([8, 16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let once = 2.0 * 128.0 * 8.0 * 16.0;
        // x needs no gradient: the forward and w's gradient.
        let flops = count_flops(|| {
            x.matmul(&w).sum(Kind::Float).backward();
            Ok(())
        })
        .unwrap();
        assert_eq!(flops, 2.0 * once);
        let x = x.set_requires_grad(true);
        let flops = count_flops(|| {
            x.matmul(&w).sum(Kind::Float).backward();
            Ok(())
        })
        .unwrap();
        assert_eq!(flops, 3.0 * once);
    }

    #[test]
    fn a_frozen_convolution_computes_only_its_input_gradient() {
        let x =
            Tensor::randn([2, 4, 8, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([6, 4, 3, 3], (Kind::Float, tch::Device::Cpu));
        let once = 2.0 * 2.0 * 6.0 * 4.0 * 3.0 * 3.0 * 8.0 * 8.0;
        let flops = count_flops(|| {
            x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
                .sum(Kind::Float)
                .backward();
            Ok(())
        })
        .unwrap();
        assert_eq!(flops, 2.0 * once);
    }
}
