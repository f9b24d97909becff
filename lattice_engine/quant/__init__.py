"""Weight formats (how a matrix is stored) and quant methods (which format each tensor gets)."""
