//! PNG plots drawn by hand: rectangles, lines and an 8×8 bitmap font (`font8x8`, public domain) on an RGB canvas,
//! encoded with the `png` crate. No system fonts are needed.

use std::path::Path;

use anyhow::{Context, Result};
use font8x8::{UnicodeFonts, BASIC_FONTS};

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [200, 200, 200];

/// Colours for series in line charts.
pub const PALETTE: &[Rgb] = &[
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

pub struct Canvas {
    pub w: usize,
    pub h: usize,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: usize, h: usize, bg: Rgb) -> Self {
        let mut px = vec![0u8; w * h * 3];
        for p in px.chunks_mut(3) {
            p.copy_from_slice(&bg);
        }
        Canvas { w, h, px }
    }

    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.w + x) * 3;
        [self.px[i], self.px[i + 1], self.px[i + 2]]
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    pub fn rect_outline(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        self.line(x, y, x + w - 1, y, c, 1);
        self.line(x, y + h - 1, x + w - 1, y + h - 1, c, 1);
        self.line(x, y, x, y + h - 1, c, 1);
        self.line(x + w - 1, y, x + w - 1, y + h - 1, c, 1);
    }

    /// A line `thick` pixels wide (Bresenham, with a square brush).
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let r = thick / 2;
        loop {
            self.fill_rect(x - r, y - r, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 8 * scale
    }

    /// Draws `s` with its top-left corner at (x, y); unknown characters draw as '?'.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = BASIC_FONTS
                .get(ch)
                .or_else(|| BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.fill_rect(
                            x + (i as i64 * 8 + col) * scale,
                            y + row as i64 * scale,
                            scale,
                            scale,
                            c,
                        );
                    }
                }
            }
        }
    }

    pub fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        self.text(cx - Self::text_width(s, scale) / 2, y, s, scale, c);
    }

    pub fn save_png(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header()?;
        wr.write_image_data(&self.px)?;
        wr.finish()?;
        Ok(())
    }
}

/// Score colour: red (0) → yellow (50) → green (100), the classic NIAH map.
pub fn score_colour(v: f64) -> Rgb {
    let red = [240.0, 73.0, 110.0];
    let yellow = [235.0, 184.0, 57.0];
    let green = [12.0, 215.0, 159.0];
    let t = (v / 100.0).clamp(0.0, 1.0);
    let (a, b, u) = if t < 0.5 {
        (red, yellow, t * 2.0)
    } else {
        (yellow, green, (t - 0.5) * 2.0)
    };
    let mix = |i: usize| (a[i] + (b[i] - a[i]) * u).round() as u8;
    [mix(0), mix(1), mix(2)]
}

/// A heatmap: `values[row][col]` (None = not run, drawn grey), rows labelled on the left (y), columns below (x),
/// each cell printed with its value.
pub fn heatmap(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xticks: &[String],
    yticks: &[String],
    values: &[Vec<Option<f64>>],
) -> Result<()> {
    let cell_w = 64i64;
    let cell_h = 28i64;
    let left = 16 + Canvas::text_width("depth 100%", 1).max(Canvas::text_width(ylabel, 1)) + 16;
    let top = 56i64;
    let (nc, nr) = (xticks.len() as i64, yticks.len() as i64);
    let legend_w = 90;
    let w = (left + nc * cell_w + legend_w).max(Canvas::text_width(title, 2) + 32);
    let h = top + nr * cell_h + 56;
    let mut c = Canvas::new(w as usize, h as usize, WHITE);
    c.text_centered(w / 2, 12, title, 2, BLACK);
    c.text(16, top - 16, ylabel, 1, BLACK);
    for (r, row) in values.iter().enumerate() {
        let y = top + r as i64 * cell_h;
        c.text(
            left - 8 - Canvas::text_width(&yticks[r], 1),
            y + cell_h / 2 - 4,
            &yticks[r],
            1,
            BLACK,
        );
        for (col, v) in row.iter().enumerate() {
            let x = left + col as i64 * cell_w;
            let colour = v.map_or(GREY, score_colour);
            c.fill_rect(x, y, cell_w, cell_h, colour);
            c.rect_outline(x, y, cell_w, cell_h, WHITE);
            let label = v.map_or("-".to_string(), |v| format!("{v:.0}"));
            c.text_centered(x + cell_w / 2, y + cell_h / 2 - 4, &label, 1, BLACK);
        }
    }
    let by = top + nr * cell_h + 8;
    for (col, t) in xticks.iter().enumerate() {
        c.text_centered(left + col as i64 * cell_w + cell_w / 2, by, t, 1, BLACK);
    }
    c.text_centered(left + nc * cell_w / 2, by + 20, xlabel, 1, BLACK);
    // Colour bar.
    let lx = left + nc * cell_w + 24;
    let lh = (nr * cell_h).max(60);
    for i in 0..lh {
        let v = 100.0 * (1.0 - i as f64 / (lh - 1).max(1) as f64);
        c.fill_rect(lx, top + i, 16, 1, score_colour(v));
    }
    c.text(lx + 20, top, "100", 1, BLACK);
    c.text(lx + 20, top + lh - 8, "0", 1, BLACK);
    c.save_png(path)
}

/// A line chart of named series of (x, y) points; `x_log` puts x on a log₂ scale.
pub fn line_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_log: bool,
) -> Result<()> {
    let (w, h) = (720i64, 460i64);
    let (left, right, top, bottom) = (72i64, 200i64, 48i64, 56i64);
    let mut c = Canvas::new(w as usize, h as usize, WHITE);
    c.text_centered(w / 2, 12, title, 2, BLACK);
    let fx = |x: f64| if x_log { x.max(1e-12).log2() } else { x };
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(fx(p.0)), b.max(fx(p.0)))
    });
    let mut y1 = pts.iter().fold(0.0f64, |a, p| a.max(p.1));
    if pts.is_empty() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let y0 = 0.0;
    y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.08 };
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |x: f64| left + ((fx(x) - x0) / (x1 - x0) * pw as f64).round() as i64;
    let py = |y: f64| top + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64;
    // Axes and grid.
    for i in 0..=5 {
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        let y = py(yv);
        c.line(left, y, left + pw, y, [235, 235, 235], 1);
        let l = fmt_tick(yv);
        c.text(left - 8 - Canvas::text_width(&l, 1), y - 4, &l, 1, BLACK);
    }
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let mut last_end = i64::MIN;
    for x in &xs {
        let l = fmt_tick(*x);
        let cx = px(*x);
        let tw = Canvas::text_width(&l, 1);
        c.line(cx, top + ph, cx, top + ph + 4, BLACK, 1);
        if cx - tw / 2 > last_end + 4 {
            c.text_centered(cx, top + ph + 8, &l, 1, BLACK);
            last_end = cx + tw / 2;
        }
    }
    c.line(left, top, left, top + ph, BLACK, 1);
    c.line(left, top + ph, left + pw, top + ph, BLACK, 1);
    c.text_centered(left + pw / 2, h - 24, xlabel, 1, BLACK);
    c.text(8, top - 18, ylabel, 1, BLACK);
    // Series and legend.
    for (i, (name, s)) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        let mut s = s.clone();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w2 in s.windows(2) {
            c.line(px(w2[0].0), py(w2[0].1), px(w2[1].0), py(w2[1].1), col, 2);
        }
        for p in &s {
            c.fill_rect(px(p.0) - 3, py(p.1) - 3, 7, 7, col);
        }
        let ly = top + 8 + i as i64 * 18;
        c.fill_rect(left + pw + 16, ly, 14, 8, col);
        let name: String = name.chars().take(20).collect();
        c.text(left + pw + 36, ly, &name, 1, BLACK);
    }
    c.save_png(path)
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 && (v / 1024.0).fract().abs() < 1e-9 {
        format!("{}k", v / 1024.0)
    } else if v.abs() >= 100.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_and_text_pixels() {
        assert_eq!(score_colour(0.0), [240, 73, 110]);
        assert_eq!(score_colour(100.0), [12, 215, 159]);
        let mut c = Canvas::new(20, 10, WHITE);
        c.text(0, 0, "1", 1, BLACK);
        let dark = (0..10)
            .flat_map(|y| (0..8).map(move |x| (x, y)))
            .filter(|&(x, y)| c.pixel(x, y) == BLACK)
            .count();
        assert!(dark > 5, "the glyph drew {dark} pixels");
        assert_eq!(c.pixel(15, 5), WHITE);
    }

    #[test]
    fn heatmap_writes_a_png_with_cell_colours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.png");
        heatmap(
            &p,
            "t",
            "length",
            "depth",
            &["1k".into(), "2k".into()],
            &["0%".into(), "100%".into()],
            &[vec![Some(100.0), Some(0.0)], vec![None, Some(50.0)]],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert!(info.width > 128 && info.height > 56);
    }
}
