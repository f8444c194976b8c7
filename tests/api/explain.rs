//! Why two images match (`GET /gallery/{a}/explain/{b}`, `POST /verify?explain=true`):
//! one object pasted into two unrelated backgrounds, at opposite corners; the
//! hottest cells of both maps are on the object.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, Rgb, RgbImage};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use lookalike::preprocess::to_rgb_on_white;

use crate::support::{assert_error, spawn_app_with};

const TEACHER_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0");
const SIDE: u32 = 192;
const OBJECT: u32 = 80;

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `background(x, y)` with the fruit fixture pasted at (`at`, `at`).
fn scene(background: impl Fn(u32, u32) -> Rgb<u8>, at: u32) -> Vec<u8> {
    let fruit = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clipart/fruit-0.png")).unwrap();
    let fruit = DynamicImage::ImageRgb8(to_rgb_on_white(image::load_from_memory(&fruit).unwrap()));
    let fruit = fruit.resize_exact(OBJECT, OBJECT, FilterType::Triangle).to_rgb8();
    let mut canvas = RgbImage::from_fn(SIDE, SIDE, background);
    image::imageops::overlay(&mut canvas, &fruit, at.into(), at.into());
    png(&canvas)
}

/// Cells (row, column) whose centre lies on the object pasted at (`at`, `at`).
fn object_cells(at: u32, grid: usize) -> Vec<(usize, usize)> {
    let cell = SIDE as f64 / grid as f64;
    let on = |i: usize| {
        let centre = (i as f64 + 0.5) * cell;
        centre >= at as f64 && centre < (at + OBJECT) as f64
    };
    (0..grid).flat_map(|r| (0..grid).map(move |c| (r, c))).filter(|(r, c)| on(*r) && on(*c)).collect()
}

/// The `n` hottest cells of a map, hottest first.
fn hottest(map: &Value, n: usize) -> Vec<(usize, usize)> {
    let mut cells: Vec<((usize, usize), f64)> = map
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .flat_map(|(r, row)| {
            row.as_array().unwrap().iter().enumerate().map(move |(c, v)| ((r, c), v.as_f64().unwrap()))
        })
        .collect();
    cells.sort_by(|a, b| b.1.total_cmp(&a.1));
    cells.into_iter().take(n).map(|(cell, _)| cell).collect()
}

#[tokio::test]
async fn the_hottest_cells_of_both_maps_are_on_the_object_the_images_share() {
    // The ImageNet-trained model: the distilled default matches these two scenes
    // on their backgrounds more than on the fruit, and its maps say so (README).
    let app = spawn_app_with(|c| c.model = TEACHER_MODEL_DIR.into()).await;
    // Blue and orange stripes; a green and grey checkerboard.
    let stripes = scene(|x, y| if (x + y) / 12 % 2 == 0 { Rgb([40, 70, 160]) } else { Rgb([230, 140, 40]) }, 8);
    let checks = scene(|x, y| if (x / 24 + y / 24) % 2 == 0 { Rgb([60, 150, 60]) } else { Rgb([120, 120, 120]) }, 104);
    let mut ids = Vec::new();
    for image in [&stripes, &checks] {
        let response = app.add_images(std::slice::from_ref(image), None, None).await;
        ids.push(response.json::<Value>().await.unwrap()["items"][0]["id"].as_i64().unwrap());
    }
    let explained: Value = app
        .client
        .get(app.url(&format!("/gallery/{}/explain/{}", ids[0], ids[1])))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let grid = explained["grid"].as_u64().unwrap() as usize;
    assert_eq!(explained["resize"], "stretch");
    for (map, at) in [(&explained["a"], 8), (&explained["b"], 104)] {
        let object = object_cells(at, grid);
        assert_eq!(object.len(), 9, "the object covers 3 x 3 cells");
        let top = hottest(map, 3);
        assert!(
            top.iter().all(|cell| object.contains(cell)),
            "the 3 hottest cells {top:?} are on the object {object:?}"
        );
    }

    // The same maps through /verify, uploaded rather than stored.
    let form = Form::new()
        .part("a", Part::bytes(stripes.clone()).file_name("a.png"))
        .part("b", Part::bytes(checks.clone()).file_name("b.png"));
    let verified: Value = app.post_form("/verify?explain=true", form).await.json().await.unwrap();
    assert_eq!(verified["explanation"]["a"], explained["a"], "{verified}");
    assert!((verified["similarity"].as_f64().unwrap() - explained["similarity"].as_f64().unwrap()).abs() < 1e-5);
    let plain = Form::new()
        .part("a", Part::bytes(stripes).file_name("a.png"))
        .part("b", Part::bytes(checks).file_name("b.png"));
    let plain: Value = app.post_form("/verify", plain).await.json().await.unwrap();
    assert!(plain.get("explanation").is_none(), "maps only when asked for");
    assert_error(
        app.client.get(app.url(&format!("/gallery/{}/explain/999999", ids[0]))).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    app.stop().await;
}
