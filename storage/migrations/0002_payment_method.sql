-- How the rider pays for a ride, chosen when requesting it: the built-in wallet, cash
-- to the driver, or a card processor behind the payment provider interface.
ALTER TABLE rides ADD COLUMN payment_method text NOT NULL DEFAULT 'wallet'
    CHECK (payment_method IN ('wallet', 'cash', 'card'));
