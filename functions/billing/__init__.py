"""Pay-per-request billing: a usage ledger that loses nothing (``ledger``), prices (``pricing``) and monthly
invoices (``invoices``). Money is integers of micro-units of the plan's currency throughout."""
