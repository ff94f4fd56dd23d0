-- Issue 20: the instance that made each signature (several instances may share one trail).
-- Rows from before carry ''.
ALTER TABLE signatures ADD COLUMN instance TEXT NOT NULL DEFAULT '';
