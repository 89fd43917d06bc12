from mri_platform.cli import app

app(prog_name="mri-platform")
