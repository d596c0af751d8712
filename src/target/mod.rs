//! placeholder (ignored by .gitignore)
