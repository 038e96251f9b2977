//! Small procedural datasets in the Food101 ETH layout, for tests and for fine-tuning experiments
//! that need no download.
//!
//! Each class is a dish with learnable features: a vessel (plate, bowl, board, or a wedge
//! on a plate), a base colour, a topping colour and a texture (stripes, dots, checks, rings,
//! swirl, speckles). Each image jitters position, scale, rotation, texture phase and colours
//! within bounds (see [`Jitter::draw`]) and adds noise. Two domains share the dishes but differ
//! in style, so a model can be pre-trained on one and fine-tuned on the other:
//! - `source`: white crockery on a light linen background, plain textures;
//! - `target`: yellow crockery on a blue gingham tablecloth, a warm and saturated palette and
//!   stronger noise. The shift is one of colour and background at the same brightness (the
//!   dishes' shapes and textures are kept), the kind of change a parameter-efficient method can
//!   learn at a small budget; an earlier dark target (dark crockery and cloth, vignetting, finer
//!   textures) turned the latents' channel means around, so that a model pre-trained on the
//!   source did worse on it than predicting zero.
//!
//! Output is deterministic for a spec: every image has its own random stream derived from the
//! seed, the domain, the dish, the split and its index.
use super::Split;
use crate::util::fs::{write_atomic, write_atomic_str, write_json};
use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::{ImageBuffer, Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::f32::consts::PI;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Source,
    Target,
}

impl std::str::FromStr for Domain {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "source" => Ok(Domain::Source),
            "target" => Ok(Domain::Target),
            _ => bail!("unknown synthetic domain {s:?} (expected \"source\" or \"target\")"),
        }
    }
}

/// What to generate. Defaults: 10 classes, 40 train and 10 test images each, 64 px, source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticSpec {
    /// Number of dishes, the first ones of [`DISHES`] (at most `DISHES.len()`).
    pub classes: usize,
    pub train_per_class: usize,
    pub test_per_class: usize,
    /// Side of the square images.
    pub resolution: u32,
    pub domain: Domain,
    pub seed: u64,
    /// JPEG quality, 1–100.
    pub jpeg_quality: u8,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            classes: 10,
            train_per_class: 40,
            test_per_class: 10,
            resolution: 64,
            domain: Domain::Source,
            seed: 0,
            jpeg_quality: 90,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vessel {
    Plate,
    Bowl,
    Board,
    /// A pie-like wedge on a plate.
    Wedge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Texture {
    Stripes,
    Dots,
    Checks,
    Rings,
    Swirl,
    Speckles,
}

/// A synthetic class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dish {
    /// Class name as in Food101's `classes.txt`.
    pub name: &'static str,
    /// Human label as in `labels.txt`.
    pub label: &'static str,
    pub vessel: Vessel,
    pub base: [f32; 3],
    pub topping: [f32; 3],
    pub texture: Texture,
}

const fn dish(
    name: &'static str,
    label: &'static str,
    vessel: Vessel,
    base: [f32; 3],
    topping: [f32; 3],
    texture: Texture,
) -> Dish {
    Dish {
        name,
        label,
        vessel,
        base,
        topping,
        texture,
    }
}

/// Every dish's caption as a dataset of them is captioned (the default prompt template filled with
/// its label): the texts whose words the tiny model's tokenizer gives whole-word tokens.
pub fn captions() -> Vec<String> {
    let template = super::PromptTemplate::default();
    DISHES
        .iter()
        .map(|dish| template.render(&super::prompts::human_label(dish.label)))
        .collect()
}

/// The dishes, in the order classes are taken; no two share vessel, colours and texture.
pub const DISHES: [Dish; 12] = [
    dish(
        "tomato_soup",
        "Tomato soup",
        Vessel::Bowl,
        [0.80, 0.22, 0.12],
        [0.96, 0.92, 0.80],
        Texture::Dots,
    ),
    dish(
        "pepperoni_pizza",
        "Pepperoni pizza",
        Vessel::Plate,
        [0.93, 0.72, 0.35],
        [0.70, 0.12, 0.10],
        Texture::Dots,
    ),
    dish(
        "blueberry_pie",
        "Blueberry pie",
        Vessel::Wedge,
        [0.30, 0.18, 0.45],
        [0.88, 0.70, 0.42],
        Texture::Checks,
    ),
    dish(
        "lemon_tart",
        "Lemon tart",
        Vessel::Plate,
        [0.98, 0.88, 0.25],
        // Darker than the base, so that the rings keep their contrast through the tiny VAE.
        [0.80, 0.50, 0.20],
        Texture::Rings,
    ),
    dish(
        "pea_soup",
        "Pea soup",
        Vessel::Bowl,
        [0.42, 0.65, 0.22],
        [0.95, 0.95, 0.88],
        Texture::Swirl,
    ),
    dish(
        "chocolate_cake",
        "Chocolate cake",
        Vessel::Wedge,
        [0.30, 0.16, 0.08],
        [0.60, 0.40, 0.25],
        Texture::Stripes,
    ),
    dish(
        "waffles",
        "Waffles",
        Vessel::Board,
        [0.85, 0.62, 0.30],
        [0.62, 0.40, 0.15],
        Texture::Checks,
    ),
    dish(
        "sushi_platter",
        "Sushi platter",
        Vessel::Board,
        [0.95, 0.95, 0.92],
        [0.95, 0.45, 0.30],
        Texture::Dots,
    ),
    dish(
        "caesar_salad",
        "Caesar salad",
        Vessel::Bowl,
        [0.62, 0.80, 0.38],
        [0.95, 0.90, 0.70],
        Texture::Speckles,
    ),
    dish(
        "bacon_strips",
        "Bacon strips",
        Vessel::Plate,
        [0.78, 0.35, 0.30],
        [0.96, 0.84, 0.76],
        Texture::Stripes,
    ),
    dish(
        "ramen",
        "Ramen",
        Vessel::Bowl,
        [0.88, 0.75, 0.50],
        [0.98, 0.90, 0.55],
        Texture::Rings,
    ),
    dish(
        "watermelon_slice",
        "Watermelon slice",
        Vessel::Wedge,
        [0.92, 0.25, 0.30],
        [0.10, 0.08, 0.08],
        Texture::Speckles,
    ),
];

/// The style of a domain.
struct Style {
    background: [f32; 3],
    /// Gingham tablecloth colour, if any.
    cloth: Option<[f32; 3]>,
    crockery: [f32; 3],
    board: [f32; 3],
    /// Per-channel gain and saturation applied to food colours.
    tint: [f32; 3],
    saturation: f32,
    noise: f32,
}

fn style(domain: Domain) -> Style {
    match domain {
        Domain::Source => Style {
            background: [0.92, 0.89, 0.82],
            cloth: None,
            crockery: [0.96, 0.96, 0.94],
            board: [0.66, 0.47, 0.28],
            tint: [1.0, 1.0, 1.0],
            saturation: 1.0,
            noise: 0.02,
        },
        Domain::Target => Style {
            background: [0.94, 0.93, 0.88],
            cloth: Some([0.30, 0.45, 0.75]),
            crockery: [0.98, 0.86, 0.50],
            board: [0.45, 0.30, 0.18],
            tint: [1.06, 0.98, 0.86],
            saturation: 1.3,
            noise: 0.03,
        },
    }
}

/// Per-image random parameters.
struct Jitter {
    center: [f32; 2],
    scale: f32,
    rotation: f32,
    phase: [f32; 2],
    colour: [f32; 3],
    light: [f32; 2],
}

impl Jitter {
    /// Pose varies within bounds a small model can learn in minutes: turns of +-20 degrees, a
    /// shift of 8% of the image, a texture phase below 0.3 (up to 0.6 of a dot or check cell).
    /// With any orientation and phase, the tiny preset's base model drew the average dish (a blob
    /// in the dish's colours) after 1500 or 3000 pre-training steps, with a 4x larger batch or a
    /// 2x wider U-Net alike; with these bounds it draws wedges, swirls and rings.
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let mut uniform = |lo: f32, hi: f32| rng.random_range(lo..hi);
        Self {
            center: [uniform(-0.08, 0.08), uniform(-0.08, 0.08)],
            scale: uniform(0.8, 1.1),
            rotation: uniform(-0.35, 0.35),
            phase: [uniform(0.0, 0.3), uniform(0.0, 0.3)],
            colour: [
                uniform(-0.05, 0.05),
                uniform(-0.05, 0.05),
                uniform(-0.05, 0.05),
            ],
            light: [uniform(-0.5, 0.5), uniform(-0.5, 0.5)],
        }
    }
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scale(a: [f32; 3], s: f32) -> [f32; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}

/// Applies a domain's tint and saturation to a food colour.
fn stylise(colour: [f32; 3], style: &Style, jitter: [f32; 3]) -> [f32; 3] {
    let grey = (colour[0] + colour[1] + colour[2]) / 3.0;
    let mut out = [0.0; 3];
    for c in 0..3 {
        out[c] = ((grey + (colour[c] - grey) * style.saturation) * style.tint[c] + jitter[c])
            .clamp(0.0, 1.0);
    }
    out
}

/// Coverage of the inside of a signed distance (negative inside), antialiased over `aa`.
fn coverage(distance: f32, aa: f32) -> f32 {
    (0.5 - distance / aa).clamp(0.0, 1.0)
}

/// A hash of an integer cell to [0, 1), for texture cell jitter.
fn cell_hash(x: i32, y: i32, salt: u32) -> f32 {
    let mut h = (x as u32).wrapping_mul(0x8da6_b343)
        ^ (y as u32).wrapping_mul(0xd816_3841)
        ^ salt.wrapping_mul(0xcb1a_b31f);
    h ^= h >> 13;
    h = h.wrapping_mul(0x5bd1_e995);
    h ^= h >> 15;
    (h & 0x00ff_ffff) as f32 / 16_777_216.0
}

/// How much of the topping colour shows at food-local point `q`, in [0, 1]. The patterns are
/// bold: a texture cell (dots, checks, stripes) is 0.4 dish units, 6 px of a 32 px image, and a
/// ring's period 8 px, so that each survives a 4x VAE (a latent per 4 px) and the dishes stay
/// recognisable in the tiny preset's 8x8 latents; finer ones (2-3 px) were blurred away by it.
fn texture_amount(texture: Texture, q: [f32; 2], phase: [f32; 2]) -> f32 {
    let f = 2.5;
    let (x, y) = (q[0] * f + phase[0] * 2.0, q[1] * f + phase[1] * 2.0);
    let band = |v: f32| if (v * PI).sin() > 0.0 { 1.0 } else { 0.0 };
    match texture {
        Texture::Stripes => band(x),
        Texture::Checks => {
            let parity = (x.floor() as i32 + y.floor() as i32).rem_euclid(2);
            if parity == 0 {
                1.0
            } else {
                0.0
            }
        }
        Texture::Dots => {
            let (cx, cy) = (x.floor(), y.floor());
            let dx = x - cx - 0.5 - (cell_hash(cx as i32, cy as i32, 1) - 0.5) * 0.3;
            let dy = y - cy - 0.5 - (cell_hash(cx as i32, cy as i32, 2) - 0.5) * 0.3;
            if (dx * dx + dy * dy).sqrt() < 0.3 {
                1.0
            } else {
                0.0
            }
        }
        Texture::Rings => band((q[0] * q[0] + q[1] * q[1]).sqrt() * 4.0 + phase[0]),
        Texture::Swirl => {
            let angle = q[1].atan2(q[0]);
            let radius = (q[0] * q[0] + q[1] * q[1]).sqrt();
            band(angle * 3.0 / PI + radius * 4.0 + phase[0])
        }
        Texture::Speckles => {
            let (cx, cy) = ((x * 2.0).floor() as i32, (y * 2.0).floor() as i32);
            if cell_hash(cx, cy, 3) < 0.3 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Signed distances (negative inside) of the vessel and of the food region, in dish coordinates.
fn vessel_and_food(vessel: Vessel, p: [f32; 2]) -> (f32, f32) {
    let radius = (p[0] * p[0] + p[1] * p[1]).sqrt();
    match vessel {
        Vessel::Plate => (radius - 0.8, radius - 0.58),
        Vessel::Bowl => (radius - 0.75, radius - 0.6),
        Vessel::Board => {
            let square = |half: f32| p[0].abs().max(p[1].abs()) - half;
            (square(0.72), square(0.5))
        }
        Vessel::Wedge => {
            // A 70-degree sector with its apex left of centre.
            let (dx, dy) = (p[0] + 0.45, p[1]);
            let half_angle = 35f32.to_radians();
            let side = dy.abs() * half_angle.cos() - dx * half_angle.sin();
            let wedge = side.max((dx * dx + dy * dy).sqrt() - 1.0);
            (radius - 0.85, wedge)
        }
    }
}

fn render(dish: &Dish, style: &Style, resolution: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let jitter = Jitter::draw(rng);
    let base = stylise(dish.base, style, jitter.colour);
    let topping = stylise(dish.topping, style, jitter.colour);
    let vessel_colour = if dish.vessel == Vessel::Board {
        style.board
    } else {
        style.crockery
    };
    let pixel = 2.0 / resolution as f32;
    let (sin, cos) = jitter.rotation.sin_cos();
    let noise: Vec<f32> = (0..resolution * resolution * 3)
        .map(|_| rng.random_range(-1.0f32..1.0) * style.noise)
        .collect();
    ImageBuffer::from_fn(resolution, resolution, |px, py| {
        let u = (px as f32 + 0.5) * pixel - 1.0;
        let v = (py as f32 + 0.5) * pixel - 1.0;
        let mut colour = style.background;
        if let Some(cloth) = style.cloth {
            let stripes = |t: f32| {
                // Four checks a side: each spans several latents of a 4x or 8x VAE.
                if ((t * 4.0) * PI).sin() > 0.0 {
                    0.5
                } else {
                    0.0
                }
            };
            colour = mix(colour, cloth, stripes(u) + stripes(v));
        } else {
            colour = scale(colour, 1.0 - 0.08 * v);
        }
        // Dish coordinates: undo the jittered placement.
        let (du, dv) = (
            (u - jitter.center[0]) / jitter.scale,
            (v - jitter.center[1]) / jitter.scale,
        );
        let p = [cos * du + sin * dv, -sin * du + cos * dv];
        let aa = pixel / jitter.scale;
        let (vessel_distance, food_distance) = vessel_and_food(dish.vessel, p);
        let shadow = coverage(vessel_distance - 0.06, aa * 6.0) * 0.25;
        colour = scale(colour, 1.0 - shadow);
        let rim_shade = if dish.vessel == Vessel::Bowl {
            0.85
        } else {
            1.0
        };
        colour = mix(
            colour,
            scale(vessel_colour, rim_shade),
            coverage(vessel_distance, aa),
        );
        let food = mix(base, topping, texture_amount(dish.texture, p, jitter.phase));
        let light = 1.0 + 0.12 * (p[0] * jitter.light[0] + p[1] * jitter.light[1]);
        colour = mix(colour, scale(food, light), coverage(food_distance, aa));
        let i = ((py * resolution + px) * 3) as usize;
        Rgb(std::array::from_fn(|c| {
            ((colour[c] + noise[i + c]).clamp(0.0, 1.0) * 255.0).round() as u8
        }))
    })
}

/// The random stream of one image.
fn image_rng(spec: &SyntheticSpec, dish_index: usize, split: Split, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let domain = match spec.domain {
        Domain::Source => 0u64,
        Domain::Target => 1,
    };
    let split = match split {
        Split::Train => 0u64,
        Split::Test => 1,
    };
    rng.set_stream(domain << 48 | (dish_index as u64) << 40 | split << 32 | index as u64);
    rng
}

fn encode_jpeg(image: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode_image(image)
        .context("encoding a JPEG")?;
    Ok(bytes)
}

/// Writes a synthetic dataset in the Food101 ETH layout to `out`, which must not exist or be
/// empty: `images/<class>/<id>.jpg`, `meta/{classes,labels,train,test}.txt`,
/// `meta/{train,test}.json` and `meta/synthetic.json` (the spec). Classes are listed
/// alphabetically, as in Food101.
pub fn generate_food101_like(out: &Path, spec: &SyntheticSpec) -> Result<()> {
    check_spec(out, spec)?;
    let style = style(spec.domain);
    let mut dishes: Vec<(usize, &Dish)> = DISHES.iter().take(spec.classes).enumerate().collect();
    dishes.sort_by_key(|(_, d)| d.name);

    let mut jobs = Vec::new();
    let mut listings: BTreeMap<Split, BTreeMap<&str, Vec<String>>> = BTreeMap::new();
    for &(dish_index, dish) in &dishes {
        for (split, count, first_id) in [
            (Split::Train, spec.train_per_class, 0),
            (Split::Test, spec.test_per_class, spec.train_per_class),
        ] {
            for i in 0..count {
                let entry = format!("{}/{}", dish.name, 100_000 + first_id + i);
                listings
                    .entry(split)
                    .or_default()
                    .entry(dish.name)
                    .or_default()
                    .push(entry.clone());
                jobs.push((dish_index, dish, split, i, entry));
            }
        }
    }
    jobs.par_iter()
        .try_for_each(|(dish_index, dish, split, i, entry)| {
            let image = render(
                dish,
                &style,
                spec.resolution,
                &mut image_rng(spec, *dish_index, *split, *i),
            );
            write_atomic(
                &out.join("images").join(format!("{entry}.jpg")),
                &encode_jpeg(&image, spec.jpeg_quality)?,
            )
        })?;

    write_meta(out, spec, &dishes, listings)
}

/// Refuses a spec the generator cannot draw, or an output folder that holds anything.
fn check_spec(out: &Path, spec: &SyntheticSpec) -> Result<()> {
    if spec.classes == 0 || spec.classes > DISHES.len() {
        bail!(
            "synthetic datasets have 1 to {} classes, not {}",
            DISHES.len(),
            spec.classes
        );
    }
    if spec.resolution < 8 {
        bail!(
            "synthetic resolution {} is below the minimum of 8",
            spec.resolution
        );
    }
    if !(1..=100).contains(&spec.jpeg_quality) {
        bail!("JPEG quality {} is outside 1..=100", spec.jpeg_quality);
    }
    crate::util::fs::ensure_absent_or_empty(out, "remove it or choose another output folder")?;
    Ok(())
}

/// Food101's `meta/` folder: class names and labels, each split's listing (text and JSON), and
/// the spec that drew the images.
fn write_meta(
    out: &Path,
    spec: &SyntheticSpec,
    dishes: &[(usize, &Dish)],
    mut listings: BTreeMap<Split, BTreeMap<&str, Vec<String>>>,
) -> Result<()> {
    let meta = out.join("meta");
    let lines = |items: Vec<&str>| items.iter().map(|l| format!("{l}\n")).collect::<String>();
    write_atomic_str(
        &meta.join("classes.txt"),
        &lines(dishes.iter().map(|(_, d)| d.name).collect()),
    )?;
    write_atomic_str(
        &meta.join("labels.txt"),
        &lines(dishes.iter().map(|(_, d)| d.label).collect()),
    )?;
    for split in [Split::Train, Split::Test] {
        let by_class = listings.remove(&split).unwrap_or_default();
        let entries: Vec<&str> = dishes
            .iter()
            .flat_map(|(_, d)| {
                by_class
                    .get(d.name)
                    .into_iter()
                    .flatten()
                    .map(String::as_str)
            })
            .collect();
        write_atomic_str(&meta.join(format!("{split}.txt")), &lines(entries))?;
        write_json(&meta.join(format!("{split}.json")), &by_class)?;
    }
    write_json(&meta.join("synthetic.json"), spec)
}
