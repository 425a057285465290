//! Plots of an [`Analysis`] for a person to look at: how many copies file
//! contents have, how alike the layers are, and what each way of storing
//! the set keeps. SVG, so text is the viewer's to render (no font library).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use thiserror::Error;

use crate::Analysis;

#[derive(Debug, Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    path: PathBuf,
    message: String,
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// Draws one plot on its area.
type Draw<'a> = &'a dyn Fn(&Area<'_>) -> Result<(), String>;

/// Writes `copies.svg`, `similarity.svg` (for at most
/// [`crate::MATRIX_AT_MOST`] unique layers) and `storage.svg` into `dir`
/// (created if missing); returns their paths.
pub fn write_plots(analysis: &Analysis, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    let plots: [(&str, (u32, u32), Draw<'_>); 3] = [
        ("copies.svg", (900, 500), &|area| copies(analysis, area)),
        ("similarity.svg", similarity_size(analysis), &|area| {
            similarity(analysis, area)
        }),
        ("storage.svg", (900, 420), &|area| storage(analysis, area)),
    ];
    let mut written = Vec::new();
    for (name, size, draw) in plots {
        if name == "similarity.svg" && analysis.similarity_matrix.is_none() {
            continue;
        }
        let path = dir.join(name);
        let fail = |message: String| PlotError {
            path: path.clone(),
            message,
        };
        {
            let area = SVGBackend::new(&path, size).into_drawing_area();
            area.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
            draw(&area).map_err(fail)?;
            area.present().map_err(|e| fail(e.to_string()))?;
        }
        written.push(path);
    }
    Ok(written)
}

/// Copy counts in classes that double: 1, 2, 3–4, 5–8, …
fn copy_class(copies: u64) -> usize {
    (64 - (copies.max(1) - 1).leading_zeros()) as usize
}

fn class_label(class: usize) -> String {
    match class {
        0 => "1".into(),
        1 => "2".into(),
        c => format!("{}-{}", (1u64 << (c - 1)) + 1, 1u64 << c),
    }
}

fn copies(a: &Analysis, area: &Area<'_>) -> Result<(), String> {
    let mut classes: Vec<u64> = Vec::new();
    for (&copies, &contents) in &a.copies_histogram {
        let class = copy_class(copies);
        if classes.len() <= class {
            classes.resize(class + 1, 0);
        }
        classes[class] += contents;
    }
    let top = classes.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Distinct file contents by number of copies",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..classes.len() as f64, (1u64..top * 2).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(classes.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = x - x.floor();
            if (centre - 0.5).abs() < 0.01 {
                class_label(x.floor() as usize)
            } else {
                String::new()
            }
        })
        .x_desc("copies of a content (files holding it)")
        .y_desc("distinct contents")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(
            classes
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, &n)| {
                    Rectangle::new(
                        [(i as f64 + 0.1, 1), (i as f64 + 0.9, n)],
                        RGBColor(60, 110, 180).filled(),
                    )
                }),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A label for unique layer `at`: the first image that has it and its diff_id's start.
fn layer_label(a: &Analysis, at: usize) -> String {
    let layer = &a.layers[at];
    let image = layer
        .images
        .first()
        .map(|&i| short_image_name(&a.images[i].name))
        .unwrap_or_default();
    let hex = layer
        .diff_id
        .strip_prefix("sha256:")
        .unwrap_or(&layer.diff_id);
    format!("{image} {}", hex.get(..8).unwrap_or(hex))
}

/// `oci:/images/git:latest` → `git:latest`; `docker://host/team/app:1` → `app:1`.
fn short_image_name(spec: &str) -> &str {
    spec.rsplit('/').next().unwrap_or(spec)
}

fn similarity_size(a: &Analysis) -> (u32, u32) {
    let n = a.layers.len().max(1) as u32;
    let cell = (600 / n).clamp(8, 40);
    (260 + n * cell + 40, 120 + n * cell + 60)
}

fn similarity(a: &Analysis, area: &Area<'_>) -> Result<(), String> {
    let n = a.layers.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Layer similarity (Jaccard index of distinct file contents)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(230)
        .build_cartesian_2d(0f64..n as f64, 0f64..n as f64)
        .map_err(|e| e.to_string())?;
    let label = |x: &f64, numbers: bool| {
        let at = x.floor() as usize;
        let centre = x - x.floor();
        match ((centre - 0.5).abs() < 0.01, at < n) {
            (true, true) if numbers => at.to_string(),
            // Row i is drawn at n - 1 - i, top down.
            (true, true) => format!("{} {}", layer_label(a, n - 1 - at), n - 1 - at),
            _ => String::new(),
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(2 * n + 1)
        .y_labels(2 * n + 1)
        .x_label_formatter(&|x| label(x, true))
        .y_label_formatter(&|y| label(y, false))
        .x_desc("layer (numbered as the rows)")
        .draw()
        .map_err(|e| e.to_string())?;
    let matrix = a.similarity_matrix.as_deref().unwrap_or_default();
    let cells = matrix.iter().enumerate().flat_map(|(i, row)| {
        row.iter().enumerate().map(move |(j, &s)| {
            // White for nothing in common, dark blue for the same contents.
            let shade = |full: f64| (255.0 - full * s.clamp(0.0, 1.0)) as u8;
            let row_from_top = (n - 1 - i) as f64;
            Rectangle::new(
                [
                    (j as f64, row_from_top),
                    (j as f64 + 1.0, row_from_top + 1.0),
                ],
                RGBColor(shade(225.0), shade(175.0), shade(75.0)).filled(),
            )
        })
    });
    chart.draw_series(cells).map_err(|e| e.to_string())?;
    Ok(())
}

fn storage(a: &Analysis, area: &Area<'_>) -> Result<(), String> {
    let s = &a.stored;
    let bars = [
        (
            "every layer reference, uncompressed",
            a.layer_measures.referenced_tar_bytes,
        ),
        (
            "unique layers, uncompressed",
            a.layer_measures.unique_tar_bytes,
        ),
        ("file-level dedup, raw", s.file_level_raw),
        ("skiff chunks, raw", s.chunk_level_raw),
        ("unique layers, as stored (gzip)", s.layers_compressed),
        ("file-level dedup, zstd", s.file_level_zstd),
        ("skiff chunks, zstd frames", s.chunk_level_zstd),
    ];
    let mb = |b: u64| b as f64 / 1e6;
    let top = bars.iter().map(|(_, b)| mb(*b)).fold(1.0, f64::max);
    let n = bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption("Bytes to store the set, by method", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..top * 1.1, 0f64..n as f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(2 * n + 1)
        .y_label_formatter(&|y| {
            let at = y.floor() as usize;
            match (
                (y - y.floor() - 0.5).abs() < 0.01,
                bars.get(n.wrapping_sub(1 + at)),
            ) {
                (true, Some((name, _))) => (*name).to_owned(),
                _ => String::new(),
            }
        })
        .x_desc("MB")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, b))| {
            let y = (n - 1 - i) as f64;
            Rectangle::new(
                [(0.0, y + 0.15), (mb(*b), y + 0.85)],
                RGBColor(60, 110, 180).filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_classes_double() {
        let classes: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17].map(copy_class).to_vec();
        assert_eq!(classes, [0, 1, 2, 2, 3, 3, 4, 4, 5]);
        assert_eq!(class_label(0), "1");
        assert_eq!(class_label(2), "3-4");
        assert_eq!(class_label(4), "9-16");
    }
}
