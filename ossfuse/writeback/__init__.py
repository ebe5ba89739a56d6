"""Write-back: staged versions on local disk (``staging``), their journal (``journal``), when
uploads run (``scheduler``) and how (``upload``). Kept empty of code: importing a submodule
runs this file."""
