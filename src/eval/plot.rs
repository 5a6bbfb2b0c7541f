//! Charts drawn with `plotters`, each written twice: a PNG (encoded with the `png` crate) and an SVG twin beside it.
//! Text is set in DejaVu Sans, embedded from the `dejavu` crate, so no system fonts (fontconfig, freetype) are needed:
//! plotters' `ab_glyph` feature measures it for layout, and `Raster` draws its glyphs into the PNG (plotters 0.3.7's
//! own `ab_glyph` drawing drops each glyph's side bearing, which spaces letters unevenly).

use std::path::Path;
use std::sync::Once;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

pub type Rgb = [u8; 3];

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

/// Cells that were not run.
const NOT_RUN: RGBColor = RGBColor(200, 200, 200);
const GRID: RGBColor = RGBColor(232, 232, 232);
/// Width of a line chart's legend, to the right of the plot.
const LEGEND_W: u32 = 240;
/// The family every text uses; the SVG twin names it too, so a viewer picks its own sans-serif.
const FAMILY: &str = "sans-serif";

fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Registers DejaVu Sans with plotters' `ab_glyph` text renderer (once per process).
fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font, shipped by the crate.
        let _ = register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular());
        let _ = register_font(FAMILY, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// DejaVu Sans regular and bold, parsed once.
fn faces() -> &'static (FontRef<'static>, FontRef<'static>) {
    static FACES: std::sync::OnceLock<(FontRef<'static>, FontRef<'static>)> =
        std::sync::OnceLock::new();
    FACES.get_or_init(|| {
        let parse =
            |b: &'static [u8]| FontRef::try_from_slice(b).expect("dejavu ships a valid font");
        (parse(dejavu::sans::regular()), parse(dejavu::sans::bold()))
    })
}

/// plotters' bitmap backend with text drawn by [`draw_glyphs`]; everything else is passed through.
struct Raster<'a>(BitMapBackend<'a>);

impl DrawingBackend for Raster<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.present()
    }

    fn draw_pixel(
        &mut self,
        p: BackendCoord,
        c: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_pixel(p, c)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        a: BackendCoord,
        b: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_rect(a, b, style, fill)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let mut err = Ok(());
        draw_glyphs(text, style, pos, |p, c| {
            if err.is_ok() {
                err = self.0.draw_pixel(p, c);
            }
        });
        err
    }
}

/// Lays `text` out along its baseline (advances, kerning and side bearings) and calls `pixel` with each covered
/// pixel, its colour's alpha scaled by the glyph coverage; the style's anchor and rotation apply as in plotters.
fn draw_glyphs<S: BackendTextStyle>(
    text: &str,
    style: &S,
    pos: BackendCoord,
    mut pixel: impl FnMut(BackendCoord, BackendColor),
) {
    let colour = style.color();
    if colour.alpha == 0.0 {
        return;
    }
    let (regular, bold) = faces();
    let font = match style.style() {
        FontStyle::Bold => bold,
        _ => regular,
    };
    let scale = PxScale::from(style.size() as f32);
    let sf = font.as_scaled(scale);
    let mut glyphs = Vec::new();
    let mut caret = 0.0f32;
    let mut prev = None;
    for ch in text.chars() {
        let id = font.glyph_id(ch);
        if let Some(p) = prev {
            caret += sf.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(scale, ab_glyph::point(caret, sf.ascent())));
        caret += sf.h_advance(id);
        prev = Some(id);
    }
    let (w, h) = (caret.round() as i32, sf.height().round() as i32);
    let dx = match style.anchor().h_pos {
        HPos::Left => 0,
        HPos::Center => -w / 2,
        HPos::Right => -w,
    };
    let dy = match style.anchor().v_pos {
        VPos::Top => 0,
        VPos::Center => -h / 2,
        VPos::Bottom => -h,
    };
    let trans = style.transform();
    for g in glyphs {
        if let Some(o) = font.outline_glyph(g) {
            let b = o.px_bounds();
            o.draw(|x, y, cov| {
                if cov <= 0.0 {
                    return;
                }
                let (x, y) = trans.transform(
                    b.min.x as i32 + x as i32 + dx,
                    b.min.y as i32 + y as i32 + dy,
                );
                let c = BackendColor {
                    alpha: colour.alpha * cov.min(1.0) as f64,
                    rgb: colour.rgb,
                };
                pixel((pos.0 + x, pos.1 + y), c);
            });
        }
    }
}

type Png<'a> = DrawingArea<Raster<'a>, Shift>;
type Svg<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws a picture into a PNG at `path` and its SVG twin at `path` with the extension `svg` (the same drawing code,
/// generic over the backend, passed once per backend).
fn render(
    path: &Path,
    (w, h): (u32, u32),
    png: impl FnOnce(&Png) -> Result<()>,
    svg_draw: impl FnOnce(&Svg) -> Result<()>,
) -> Result<()> {
    fonts();
    let mut px = vec![255u8; w as usize * h as usize * 3];
    {
        let root = Raster(BitMapBackend::with_buffer(&mut px, (w, h))).into_drawing_area();
        png(&root)?;
        root.present()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    save_png(path, w, h, &px)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        svg_draw(&root)?;
        root.present()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    let sp = path.with_extension("svg");
    crate::util::write_atomic(&sp, svg.as_bytes())
}

fn save_png(path: &Path, w: u32, h: u32, px: &[u8]) -> Result<()> {
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header()?;
    wr.write_image_data(px)?;
    wr.finish()?;
    crate::util::write_atomic(path, &bytes)
}

/// A linear f64 axis whose ticks are the given values (plotters' `with_key_points` over f64 cannot be labelled in
/// 0.3.7). `from > to` runs the axis backwards.
struct Axis {
    from: f64,
    to: f64,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.from) / (self.to - self.from);
        limit.0 + ((limit.1 - limit.0) as f64 * t).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _: H) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.from..self.to
    }
}

/// Plotters' drawing errors carry the backend's error type; this keeps only their message.
fn de<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
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

/// A heatmap: `values[row][col]` (None = not run, drawn grey), rows labelled on the left (y, first row at the top),
/// columns below (x), each cell printed with its value, and a colour bar on the right.
pub fn heatmap(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xticks: &[String],
    yticks: &[String],
    values: &[Vec<Option<f64>>],
) -> Result<()> {
    let (nc, nr) = (xticks.len().max(1), yticks.len().max(1));
    let (cell_w, cell_h) = (72u32, 34u32);
    let bar_w = 110u32;
    let w = (150 + nc as u32 * cell_w + bar_w).max(title.chars().count() as u32 * 12 + 40);
    let h = 130 + nr as u32 * cell_h;
    render(
        path,
        (w, h),
        |root| draw_heatmap(root, title, xlabel, ylabel, xticks, yticks, values, bar_w),
        |root| draw_heatmap(root, title, xlabel, ylabel, xticks, yticks, values, bar_w),
    )
}

#[allow(clippy::too_many_arguments)]
fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xticks: &[String],
    yticks: &[String],
    values: &[Vec<Option<f64>>],
    bar_w: u32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(de)?;
    let root = root
        .titled(title, (FAMILY, 22).into_font().style(FontStyle::Bold))
        .map_err(de)?;
    let (pw, _) = root.dim_in_pixel();
    let (main, bar) = root.split_horizontally(pw.saturating_sub(bar_w));
    let (nc, nr) = (xticks.len().max(1), yticks.len().max(1));
    let centres = |n: usize| (0..n).map(|i| i as f64 + 0.5).collect::<Vec<_>>();
    let label = |ticks: &[String], v: f64| {
        let i = v.floor();
        if i >= 0.0 {
            ticks.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(&main)
        .margin(8)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            Axis {
                from: 0.0,
                to: nc as f64,
                ticks: centres(nc),
            },
            // Reversed, so the first row (depth 0 %) is at the top.
            Axis {
                from: nr as f64,
                to: 0.0,
                ticks: centres(nr),
            },
        )
        .map_err(de)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .x_label_formatter(&|v| label(xticks, *v))
        .y_label_formatter(&|v| label(yticks, *v))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(de)?;
    let cells = values.iter().enumerate().flat_map(|(r, row)| {
        row.iter().enumerate().map(move |(c, v)| {
            let (x, y) = (c as f64, r as f64);
            let fill = v.map_or(NOT_RUN, |v| rgb(score_colour(v)));
            Rectangle::new([(x, y), (x + 1.0, y + 1.0)], fill.filled())
        })
    });
    chart.draw_series(cells).map_err(de)?;
    let borders = (0..nr).flat_map(|r| {
        (0..nc).map(move |c| {
            let (x, y) = (c as f64, r as f64);
            Rectangle::new([(x, y), (x + 1.0, y + 1.0)], WHITE.stroke_width(2))
        })
    });
    chart.draw_series(borders).map_err(de)?;
    let centred = (FAMILY, 15)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let numbers = values.iter().enumerate().flat_map(|(r, row)| {
        let centred = centred.clone();
        row.iter().enumerate().map(move |(c, v)| {
            let s = v.map_or("-".to_string(), |v| format!("{v:.0}"));
            Text::new(s, (c as f64 + 0.5, r as f64 + 0.5), centred.clone())
        })
    });
    chart.draw_series(numbers).map_err(de)?;
    // Colour bar: score 0..100, a thin rectangle per step.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(8)
        .margin_bottom(56)
        .margin_left(16)
        .margin_right(8)
        .y_label_area_size(0)
        .right_y_label_area_size(40)
        .build_cartesian_2d(0.0..1.0, 0.0..100.0)
        .map_err(de)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FAMILY, 13))
        .draw()
        .map_err(de)?;
    let steps = (0..100).map(|i| {
        let v = i as f64;
        Rectangle::new(
            [(0.0, v), (1.0, v + 1.0)],
            rgb(score_colour(v + 0.5)).filled(),
        )
    });
    cb.draw_series(steps).map_err(de)?;
    Ok(())
}

/// A line chart of named series of (x, y) points; `x_log` puts x on a log₂ scale. The x ticks sit on the data's x
/// values; the legend is to the right of the plot.
pub fn line_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_log: bool,
) -> Result<()> {
    render(
        path,
        (600 + LEGEND_W, 500),
        |root| draw_line_chart(root, title, xlabel, ylabel, series, x_log),
        |root| draw_line_chart(root, title, xlabel, ylabel, series, x_log),
    )
}

fn draw_line_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_log: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let fx = |x: f64| if x_log { x.max(1e-12).log2() } else { x };
    let ix = |v: f64| if x_log { v.exp2() } else { v };
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
    // A margin either side so the end points and their labels are not on the frame.
    let pad = (x1 - x0) * 0.04;
    y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.08 };
    let mut xs: Vec<f64> = pts.iter().map(|p| fx(p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    // Thin the ticks so their labels do not run into each other (about 60 px a label on a ~600 px axis).
    let span = (x1 - x0 + 2.0 * pad).max(1e-12);
    let mut keys: Vec<f64> = Vec::new();
    for x in xs {
        if keys.last().is_none_or(|l| (x - l) / span > 0.09) {
            keys.push(x);
        }
    }
    if keys.is_empty() {
        keys.push(x0);
    }

    root.fill(&WHITE).map_err(de)?;
    let root = root
        .titled(title, (FAMILY, 22).into_font().style(FontStyle::Bold))
        .map_err(de)?;
    let (pw, _) = root.dim_in_pixel();
    let (main, legend) = root.split_horizontally(pw.saturating_sub(LEGEND_W));
    let mut chart = ChartBuilder::on(&main)
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            Axis {
                from: x0 - pad,
                to: x1 + pad,
                ticks: keys,
            },
            0.0..y1,
        )
        .map_err(de)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID)
        .y_labels(6)
        .x_desc(xlabel)
        .y_desc(ylabel)
        .x_label_formatter(&|v| fmt_tick(ix(*v)))
        .y_label_formatter(&|v| fmt_tick(*v))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(de)?;
    for (i, (_, s)) in series.iter().enumerate() {
        let col = rgb(PALETTE[i % PALETTE.len()]);
        let mut s: Vec<(f64, f64)> = s.iter().map(|&(x, y)| (fx(x), y)).collect();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(s.iter().copied(), col.stroke_width(2)))
            .map_err(de)?;
        chart
            .draw_series(s.iter().map(|&p| Circle::new(p, 4, col.filled())))
            .map_err(de)?;
    }
    // Legend: a coloured line with a dot, then the name (cut to fit).
    let font = (FAMILY, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (name, _)) in series.iter().enumerate() {
        let col = rgb(PALETTE[i % PALETTE.len()]);
        let y = 24 + i as i32 * 22;
        legend
            .draw(&PathElement::new(
                vec![(4, y), (28, y)],
                col.stroke_width(2),
            ))
            .map_err(de)?;
        legend
            .draw(&Circle::new((16, y), 4, col.filled()))
            .map_err(de)?;
        let name = if name.chars().count() > 26 {
            name.chars().take(25).chain(['…']).collect()
        } else {
            name.clone()
        };
        legend
            .draw(&Text::new(name, (36, y), font.clone()))
            .map_err(de)?;
    }
    Ok(())
}

fn fmt_tick(v: f64) -> String {
    // Powers of two read back from a log₂ axis are off by rounding: snap to the nearest integer first.
    let v = if (v - v.round()).abs() < 1e-6 * v.abs().max(1.0) {
        v.round()
    } else {
        v
    };
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

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        (info.width, info.height, buf)
    }

    #[test]
    fn colours_and_ticks() {
        assert_eq!(score_colour(0.0), [240, 73, 110]);
        assert_eq!(score_colour(100.0), [12, 215, 159]);
        assert_eq!(fmt_tick(2048.0), "2k");
        assert_eq!(fmt_tick(11.0f64.exp2() * (1.0 + 1e-12)), "2k");
        assert_eq!(fmt_tick(700.0), "700");
        assert_eq!(fmt_tick(0.25), "0.25");
    }

    #[test]
    fn heatmap_writes_a_png_with_cell_colours_and_an_svg_twin() {
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
        let (w, h, px) = decode(&p);
        assert!(w > 128 && h > 56);
        let count = |c: Rgb| px.chunks(3).filter(|p| *p == c).count();
        // Each cell is ~72×34 px of its colour, less its value's text and border.
        for c in [score_colour(100.0), score_colour(0.0), score_colour(50.0)] {
            assert!(count(c) > 1000, "{c:?} covers {} px", count(c));
        }
        assert!(count([200, 200, 200]) > 1000, "the not-run cell is grey");
        // Text was drawn: dark pixels from the glyphs (title, ticks, labels, values).
        let dark = px.chunks(3).filter(|p| p.iter().all(|&v| v < 80)).count();
        assert!(dark > 300, "only {dark} dark pixels");
        let svg = std::fs::read_to_string(dir.path().join("h.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text") && svg.contains("\n1k\n"));
    }

    #[test]
    fn line_chart_draws_every_series_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        let series = vec![
            ("full".to_string(), vec![(1024.0, 10.0), (4096.0, 8.0)]),
            (
                "snapkv@0.25".to_string(),
                vec![(1024.0, 12.0), (4096.0, 11.0)],
            ),
        ];
        line_chart(&p, "speed", "prompt tokens", "tok/s", &series, true).unwrap();
        let (_, _, px) = decode(&p);
        for c in &PALETTE[..2] {
            let n = px.chunks(3).filter(|p| *p == c).count();
            assert!(n > 100, "series colour {c:?} covers {n} px");
        }
        let svg = std::fs::read_to_string(dir.path().join("l.svg")).unwrap();
        assert!(
            svg.contains("\nsnapkv@0.25\n") && svg.contains("\n4k\n"),
            "{svg}"
        );
        // Nothing to plot still draws axes.
        line_chart(&p, "empty", "x", "y", &[], false).unwrap();
    }
}
