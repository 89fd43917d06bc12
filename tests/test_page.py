"""The service's web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

import io
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mri_platform.data import load_builtin

pytestmark = pytest.mark.slow


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _status_settled(driver) -> str | bool:
    text = driver.find_element("id", "status").text
    return text if text.startswith(("Done", "Error")) else False


def _upload(driver, url: str, path: Path, add_noise: bool) -> str:
    driver.get(f"{url}/ui")
    _wait(driver, lambda d: "models:/" in d.find_element("id", "model-info").text)
    driver.find_element("id", "file").send_keys(str(path))
    checkbox = driver.find_element("id", "add-noise")
    if checkbox.is_selected() != add_noise:
        checkbox.click()
    driver.find_element("id", "run").click()
    return _wait(driver, _status_settled)


def _natural_width(driver, element_id: str) -> int:
    return driver.execute_script(f"return document.getElementById('{element_id}').naturalWidth")


def test_page_shows_original_noisy_and_denoised_with_scores(browser, bento_server, built_bento, tmp_path):
    clean = load_builtin()[1].images[20]  # a real held-out MRI slice
    path = tmp_path / "clean-slice.png"
    Image.fromarray((clean * 255).astype(np.uint8)).resize((256, 256)).save(path)
    status = _upload(browser, bento_server.url, path, add_noise=True)
    assert status.startswith("Done"), status
    info = browser.find_element("id", "model-info").text
    assert f"models:/mri-denoiser/{built_bento['version']}" in info and "UNET, 8 filters" in info
    assert "Denoises every image at its own resolution (in tiles of 256 x 256 above that)" in info
    assert "SSIM" in info and "(held-out split of the built-in data at 64 x 64)" in info  # what the score means
    for element_id in ("original", "noisy", "denoised"):  # the served U-Net works at the upload's own size
        assert browser.find_element("id", element_id).is_displayed()
        assert _natural_width(browser, element_id) == 256
    resolution = browser.find_element("id", "resolution")
    assert resolution.is_displayed() and "denoised at the image's own 256 x 256" in resolution.text
    rows = browser.find_elements("css selector", "#metrics tbody tr")
    scores = {row.find_elements("tag name", "td")[0].text: float(row.find_elements("tag name", "td")[1].text)
              for row in rows}  # fmt: skip
    assert set(scores) == {"noisy", "denoised"} and scores["denoised"] > scores["noisy"] + 3
    link = browser.find_element("id", "download")
    assert link.is_displayed() and link.get_attribute("download") == "clean-slice-noisy-denoised.png"
    assert "256 x 256 PNG" in link.text
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0


def test_page_denoises_a_volume_and_offers_it_for_download(browser, bento_server, tmp_path):
    path = tmp_path / "example4d.nii.gz"
    path.write_bytes((resources.files("nibabel") / "tests/data/example4d.nii.gz").read_bytes())
    status = _upload(browser, bento_server.url, path, add_noise=False)
    assert status == "Done.", status
    assert not browser.find_element("id", "noisy").is_displayed()
    assert _natural_width(browser, "denoised") == 96  # the middle slice at its own size: X = 128 rows, Y = 96 columns
    link = browser.find_element("id", "download")
    assert link.get_attribute("download") == "example4d-denoised.nii.gz"
    assert link.get_attribute("href").startswith("blob:")
    size = browser.execute_async_script(
        "const done = arguments[0]; fetch(document.getElementById('download').href)"
        ".then(r => r.blob()).then(b => done(b.size))"
    )
    assert size > 100_000  # the whole 128 x 96 x 24 x 2 float32 volume, gzipped


def test_page_says_what_was_wrong_with_a_bad_upload(browser, bento_server, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is a text file with a .png name")
    status = _upload(browser, bento_server.url, path, add_noise=False)
    assert status.startswith("Error: not an image"), status
    assert not browser.find_element("id", "panels").is_displayed()
    # The page (and the service) still work after the error.
    good = tmp_path / "good.png"
    buffer = io.BytesIO()
    Image.fromarray((load_builtin()[1].images[3] * 255).astype(np.uint8)).save(buffer, "PNG")
    good.write_bytes(buffer.getvalue())
    assert _upload(browser, bento_server.url, good, add_noise=False) == "Done."
