"""The HTML report in a real browser (headless Chromium through Playwright), offline.

One generated study (module fixture, no pipeline run): two volume models x two lag sets
x 12 alphas on a 20 x 24 x 18 grid with a mean-EPI underlay, permutation q-values and
bootstrap means, and one joint model of both (``r2_split``, ``partition``), plus one
joint fit on fsaverage5 (both hemispheres) for ``view_surf`` and the surface
which-space figure.  The
report folder is copied elsewhere before it is opened, with every request other than
``file://`` aborted.  Skips with one line when no browser is found.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from scipy import stats

from voxelflow.pipeline.study.report import (FitResult, displayed_values, map_geometry,
                                              table_markdown, write_report)
from voxelflow.pipeline.study.report.figures import plot_label_map
from voxelflow.pipeline.study.report.page import CSS, table2_html
from voxelflow.pipeline.study.report.tables import summary_table

GRID = (20, 24, 18)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
ALPHAS = [0.5, 1, 5, 10, 1e2, 1e3, 1e4, 2.5e4, 5e4, 1e5, 1e6, 1e7]
N_TEST, RESAMPLES = 60, 50
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                             "/usr/bin/google-chrome") if Path(p).exists()), None)


def _brain() -> np.ndarray:
    """A boolean ellipsoid 'brain' on GRID."""
    i, j, k = np.indices(GRID)
    return ((i - 9.5) / 8) ** 2 + ((j - 11.5) / 10) ** 2 + ((k - 8.5) / 7) ** 2 < 1


def _fit(rng, n_voxel: int, strength: float, coords: dict) -> xr.Dataset:
    """Fit-shaped results: r per alpha rising to alpha 1e3, permutation q-values from
    the parametric p of r_test_cv (BH), bootstrap means around the mean r."""
    signal = strength * rng.uniform(0, 1, n_voxel) ** 3
    shape = np.exp(-0.5 * ((np.log10(ALPHAS) - 3) / 2) ** 2)
    r_test = (shape[:, None] * signal + rng.normal(0, 0.03, (len(ALPHAS), n_voxel)))
    best = rng.choice([1e2, 1e3, 1e3, 1e4], n_voxel).astype(np.float32)
    r_cv = r_test[[ALPHAS.index(b) for b in best], np.arange(n_voxel)]
    t = r_cv * np.sqrt((N_TEST - 2) / (1 - r_cv ** 2))
    q = stats.false_discovery_control(stats.t.sf(t, N_TEST - 2))
    return xr.Dataset(
        {"r_test": (("alpha", "voxel"), r_test.astype(np.float32)),
         "r_cv": (("alpha", "voxel"), r_test.astype(np.float32)),
         "r_test_cv": ("voxel", r_cv.astype(np.float32)), "best_alpha": ("voxel", best),
         "r2_test_cv": ("voxel", (r_cv ** 2).astype(np.float32)),
         "q_perm_fdr": ("voxel", q), "p_perm_fwe": ("voxel", np.minimum(1, q * 20)),
         "bootstrap_mean_r": ("resample", r_cv.mean() + rng.normal(0, 0.01, RESAMPLES))},
        coords={"alpha": ALPHAS, "valid": ("voxel", np.ones(n_voxel, bool)), **coords},
        attrs={"n_test": N_TEST, "test_key": "k", "lags": [4.0],
               "statistics": {"seed": 0, "block_length": 10, "bootstrap": RESAMPLES}})


SPACES = ["resnet50", "alexnet"]


def _joint(rng, fit: xr.Dataset) -> xr.Dataset:
    """``fit`` as a joint fit of SPACES: a random ``r2_split`` (alexnet ahead where
    the voxel's index is even) and the two-space ``partition``."""
    n = fit.sizes["voxel"]
    split = rng.uniform(-0.02, 0.2, (2, n))
    split[1, ::2] += 0.2
    parts = np.stack([split[0] * 0.8, split[1] * 0.8, split.sum(0) * 0.2 - 0.01])
    return fit.assign(
        r2_split=(("space", "voxel"), split.astype(np.float32)),
        partition=(("part", "voxel"), parts.astype(np.float32))).assign_coords(
        space=SPACES, part=["resnet50", "alexnet", "resnet50&alexnet"])


def _volume_study(folder: Path) -> tuple[dict, xr.Dataset]:
    rng = np.random.default_rng(0)
    ijk = np.nonzero(_brain())
    coords = {c: ("voxel", v) for c, v in zip("ijk", ijk)}
    results = [FitResult(m, lags, _fit(rng, ijk[0].size, s, coords))
               for m, s in [("alexnet_conv5_a_long_feature_space_name", 0.5), ("resnet50", 0.8)]
               for lags in ([4.0], [4.0, 5.0, 6.0, 7.0])]
    results.append(FitResult("resnet50+alexnet", [4.0],
                             _joint(rng, _fit(rng, ijk[0].size, 0.9, coords))))

    def write_values(values, path, description=""):
        volume = np.zeros(GRID, np.float32)
        volume[ijk] = values
        nib.save(nib.Nifti1Image(volume, AFFINE), str(path))

    underlay = folder / "mean_epi.nii.gz"
    write_values(1000 + 300 * rng.random(ijk[0].size), underlay)
    report = write_report(results, folder / "report", experiment="generated",
                          write_map=lambda res, path: write_values(res.fit["r_test_cv"].values,
                                                                   path),
                          write_values=write_values, underlay=underlay)
    return report, results[-1].fit


def _surface_study(folder: Path) -> dict:
    rng = np.random.default_rng(1)
    n = 10242  # fsaverage5, per hemisphere
    coords = {"hemi": ("voxel", np.repeat(["L", "R"], n)),
              "vertex": ("voxel", np.tile(np.arange(n), 2))}
    fit = _joint(rng, _fit(rng, 2 * n, 0.7, coords))
    return write_report([FitResult("surface_model", [4.0], fit)], folder / "surface",
                        experiment="surface")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("report_study")
    volume, joint_fit = _volume_study(folder)
    return {"volume": volume, "surface": _surface_study(folder), "folder": folder,
            "joint_fit": joint_fit}



# ------------------------------------------------------------ without a browser
def test_table_numbers_are_readable(study):
    table = study["volume"]["table"]
    markdown = table_markdown(table)
    assert "| 1e3 |" in markdown and "1000.000" not in markdown and "2.5e4" in markdown
    grid = table2_html(table)
    assert "&alpha;=1e3" in grid and "1000.0" not in grid
    assert grid.count("rowbest") == len(table) and grid.count(" best'") == 1


def test_viewer_threshold_is_the_smallest_significant_r(study):
    res = study["volume"]["viewers"][0]
    fit = _fit(np.random.default_rng(5), 500, 0.6, {})
    shown = displayed_values(fit)
    r, q = fit["r_test_cv"].values, fit["q_perm_fdr"].values
    significant = (q < 0.05) & (r > 0)
    assert significant.sum() == shown.n_significant > 0
    assert r[significant].min() * (1 - 1e-5) < shown.threshold < r[significant].min()
    np.testing.assert_array_equal(shown.values != 0, significant)
    assert "r >= " in res["note"] and res["viewer"].exists()


def test_figures_are_png_and_svg_with_titles_and_colourbar_labels(study):
    out = study["volume"]["files"]["html"].parent
    labels = np.zeros(GRID, np.int16)
    labels[_brain()] = 1 + (np.indices(GRID)[0][_brain()] > 9)
    nib.save(nib.Nifti1Image(labels, AFFINE), str(out / "maps" / "labels.nii.gz"))
    plot_label_map(out / "maps" / "labels.nii.gz", out / "winner_model.png", "Winning model",
                   None, ["alexnet", "resnet50"])
    for stem in ("r_vs_alpha", "r_histogram", "best_model_map", "winner_model"):
        assert (out / f"{stem}.png").stat().st_size > 1000
        assert (out / f"{stem}.svg").stat().st_size > 1000
    assert "CV-chosen alpha" in (out / "r_vs_alpha.svg").read_text()
    assert "test r (CV-selected alpha)" in (out / "best_model_map.svg").read_text()
    assert "model label: 1 alexnet, 2 resnet50" in (out / "winner_model.svg").read_text()
    svg = (out / "r_vs_alpha.svg").read_text()
    assert "Test r versus alpha" in svg and "ridge alpha" in svg


def test_joint_pieces_show_significant_voxels_only(study):
    """The which-space map of the generated joint fit: argmax of r2_split where the
    joint r > 0 is significant (q_perm_fdr < 0.05), on the volume and on the surface;
    the per-space bars of the whole mask (no atlas) are numpy means."""
    item = study["volume"]["joint"][0]
    fit = study["joint_fit"]
    split, r = fit["r2_split"].values, fit["r_test_cv"].values
    significant = (fit["q_perm_fdr"].values < 0.05) & (r > 0)
    assert 0 < significant.sum() < r.size
    expected = np.where(significant, split.argmax(axis=0) + 1, 0)
    np.testing.assert_array_equal(item["map"].labels, expected)
    volume = np.asarray(nib.load(item["files"]["which_nifti"]).dataobj)
    np.testing.assert_array_equal(volume[_brain()], expected)
    assert "significant" in item["map"].note and set(expected) == {0, 1, 2}
    rows = item["split"]
    assert set(rows["roi_name"]) == {"whole mask"} and len(rows) == 5
    for space, values in zip(SPACES, split):
        got = rows[(rows["measure"] == "r2_split") & (rows["component"] == space)]["mean"]
        np.testing.assert_allclose(got.item(), values.astype(np.float64).mean(), rtol=1e-12)
    svg = item["files"]["which_png"].with_suffix(".svg").read_text()
    assert "1 resnet50" in svg and "2 alexnet" in svg
    surface = study["surface"]["joint"][0]["files"]["which_png"].with_suffix(".svg").read_text()
    for text in ("left, inflated", "right, flat", "1 resnet50", "2 alexnet"):
        assert text in surface, text


def test_geometry_chooses_the_viewer(study):
    surface = study["surface"]["viewers"][0]
    assert surface["viewer"] is not None and surface["nifti"] is None
    page = surface["viewer"].read_text()
    assert "plotly" in page.lower() and "https://cdn" not in page.split("<script")[0]
    # the static figure of a surface fit: inflated and flat views of both hemispheres
    files = study["surface"]["files"]
    assert files["brain_map"].is_file()
    svg = files["brain_map"].with_suffix(".svg").read_text()
    for view in ("left, inflated", "left, flat", "right, inflated", "right, flat"):
        assert view in svg, view
    assert "test r (CV-selected alpha)" in svg
    assert map_geometry(_fit(np.random.default_rng(0), 3, 0.5, {})) == "volume"


# ------------------------------------------------------------------ in Chromium
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader"])
        yield chromium
        chromium.close()


def _open(browser, index: Path, width: int):
    """A page of ``index`` with network requests aborted; returns the page and the
    lists it fills (console errors, failed and blocked requests)."""
    seen = {"errors": [], "failed": [], "blocked": []}
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("requestfailed", lambda r: seen["failed"].append(r.url))

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            seen["blocked"].append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(index.as_uri(), wait_until="load")
    return page, seen


def _rendered(element) -> tuple[int, float]:
    """Distinct colours and the fraction of non-white pixels of an element's screenshot."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB"))
    flat = pixels.reshape(-1, 3)
    return len(np.unique(flat, axis=0)), float((flat.min(axis=1) < 235).mean())


def _viewer(page):
    """The viewer frame, once its page has drawn a canvas (brainsprite or plotly)."""
    page.frame_locator("#map-viewer").locator("canvas").first.wait_for(state="attached",
                                                                       timeout=20_000)
    page.wait_for_timeout(500)
    return page.locator("#map-viewer")


def test_report_opens_offline_in_chromium(study, browser, tmp_path):
    copy = tmp_path / "copied_report"
    shutil.copytree(study["volume"]["files"]["html"].parent, copy)
    assert str(study["folder"]) not in (copy / "index.html").read_text()
    page, seen = _open(browser, copy / "index.html", 1280)
    # Images: every <img> decoded.
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.src, e.naturalWidth])")
    assert len(images) == 5 and all(w > 0 for _, w in images), images
    # the joint model's pieces: which-space slices and split bars, drawn
    for stem in ("resnet50+alexnet_lags-4_which_space", "resnet50+alexnet_lags-4_space_split"):
        assert any(src.endswith(f"/{stem}.png") for src, _ in images), stem
    assert page.locator("#joint-models").is_visible()
    # Table 2 no wider than the page at 1280 px.
    widths = page.evaluate("() => [document.getElementById('table2').scrollWidth, "
                           "document.documentElement.scrollWidth]")
    assert max(widths) <= 1280, widths
    # The viewer draws the brain; the menu switches it.
    first_colours, first_ink = _rendered(_viewer(page))
    assert first_colours > 20 and first_ink > 0.05
    before = _viewer(page).screenshot()
    menu = page.locator("#map-menu")
    options = menu.locator("option").all_text_contents()
    assert len(options) == 5
    note = page.locator("#map-note").text_content()
    menu.select_option(index=3)
    page.wait_for_function("() => document.getElementById('map-viewer').src"
                           ".endsWith('viewers/resnet50_lags-4-5-6-7.html')")
    colours, ink = _rendered(_viewer(page))
    assert colours > 20 and ink > 0.05 and _viewer(page).screenshot() != before
    assert page.locator("#map-note").text_content() != note  # its own significance note
    # Sorting by a column reorders the rows.
    first_model = page.locator("#table2 tbody tr td").first.text_content()
    page.locator("#table2 th", has_text="model").click()
    page.locator("#table2 th", has_text="model").click()
    models = page.eval_on_selector_all("#table2 tbody tr td.name:first-child",
                                       "els => els.map(e => e.textContent)")
    assert models == sorted(models, reverse=True) and first_model in models
    page.screenshot(path=str(tmp_path / "report_1280.png"), full_page=True)
    page.locator("#map-viewer").scroll_into_view_if_needed()  # full-page shots drop frames
    page.screenshot(path=str(tmp_path / "report_1280_viewer.png"))
    page.set_viewport_size({"width": 800, "height": 900})
    page.screenshot(path=str(tmp_path / "report_800.png"), full_page=True)
    assert not seen["errors"], seen["errors"]
    assert not seen["failed"] and not seen["blocked"], seen
    page.close()


def test_surface_viewer_renders_offline(study, browser, tmp_path):
    page, seen = _open(browser, study["surface"]["files"]["html"], 1280)
    page.wait_for_timeout(1000)  # plotly draws after its canvas exists
    colours, ink = _rendered(_viewer(page))
    assert colours > 50 and ink > 0.05
    page.screenshot(path=str(tmp_path / "surface_1280.png"), full_page=True)
    assert not seen["errors"] and not seen["failed"] and not seen["blocked"], seen
    page.close()


def test_table2_of_20_models_fits_1280_px(browser, tmp_path):
    rng = np.random.default_rng(3)
    coords = {}
    results = [FitResult(f"model_{m:02d}_layer{m % 5}_{'pooled' if m % 2 else 'flat'}",
                         lags, _fit(rng, 40, 0.5, coords))
               for m in range(20) for lags in ([4.0], [4.0, 5.0], [4.0, 5.0, 6.0, 7.0],
                                               [2.0, 4.0, 6.0, 8.0, 10.0])]
    html = (f"<!doctype html><html><head><meta charset='utf-8'><style>{CSS}</style></head>"
            f"<body>{table2_html(summary_table(results))}</body></html>")
    (tmp_path / "t2.html").write_text(html)
    page, seen = _open(browser, tmp_path / "t2.html", 1280)
    width = page.evaluate("() => document.getElementById('table2').scrollWidth")
    assert width <= 1280 - 24, width
    page.screenshot(path=str(tmp_path / "table2_20_models.png"), full_page=True)
    assert not seen["errors"]
    page.close()
