-- Issue 16: failed verifications of one job are recorded per interval, one row carrying how
-- many attempts it stands for (every other row stands for one).
ALTER TABLE audit ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
