"""One module per `dropkit` subcommand: argument parsing and printing only; the work lives in the library."""
