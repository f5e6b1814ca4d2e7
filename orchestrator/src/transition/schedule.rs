//! Schedules, pure: which ticks a cron expression in a time zone has, and, given a schedule's
//! stored next tick, the time now and its catch-up policy, which ticks fire and which tick is
//! next. No clock is read here: callers pass `now` (the database's), tests a fixed one.
//!
//! **Wall clock, then instants.** The expression is matched against the wall clock of the
//! time zone ([`croner`] searches local date-times as if there were no daylight saving time);
//! each matching local time is then turned into an instant by one rule:
//! - a local time that exists once is that instant;
//! - a local time that does not exist (the clock jumps over it, spring forward) fires at the
//!   next valid instant, the end of the gap: `30 2 * * *` in Europe/Paris on the last Sunday of
//!   March fires at 03:00 CEST (01:00 UTC);
//! - a local time that exists twice (fall back) fires once, at its first (earlier) instant.
//!
//! Ticks are instants, and a tick fires at most once: several local times that become the same
//! instant (every minute of a one-hour gap) are one tick.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use tasker_schemas::api::{CatchUp, MAX_CATCH_UP_TICKS, MAX_CRON_LEN, MAX_TIMEZONE_LEN};

/// Most wall-clock matches examined to find one tick (a tick an every-second expression has in
/// a fall-back hour is found within 3,600).
const MAX_STEPS: usize = 100_000;

/// Most missed ticks counted exactly when they are skipped; more are reported as "at least".
pub const MAX_COUNTED_SKIPS: u64 = 10_000;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Spec {
    cron: Cron,
    tz: Tz,
}

impl Spec {
    /// Parses `cron` (5 fields, or 6 with seconds first; `@daily` and the like) in `timezone`
    /// (an IANA name). Refuses an expression that has no tick after `now`.
    pub fn parse(cron: &str, timezone: &str, now: DateTime<Utc>) -> Result<Spec, String> {
        let spec = Spec::read(cron, timezone)?;
        if spec.next_after(now).is_none() {
            return Err(format!("cron expression {cron:?} has no future time"));
        }
        Ok(spec)
    }

    /// [`Spec::parse`] without the check for a future tick (a stored schedule's).
    pub fn read(cron: &str, timezone: &str) -> Result<Spec, String> {
        if cron.len() > MAX_CRON_LEN {
            return Err(format!(
                "cron is {} bytes; at most {MAX_CRON_LEN} are allowed",
                cron.len()
            ));
        }
        if timezone.len() > MAX_TIMEZONE_LEN {
            return Err(format!(
                "timezone is {} bytes; at most {MAX_TIMEZONE_LEN} are allowed",
                timezone.len()
            ));
        }
        let tz: Tz = timezone.parse().map_err(|_| {
            format!(
                "unknown time zone {timezone:?}: expected an IANA name such as Europe/Paris or UTC"
            )
        })?;
        let parsed = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| format!("invalid cron expression {cron:?}: {e}"))?;
        Ok(Spec { cron: parsed, tz })
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The instant of a local wall-clock time, by the rule of the module's documentation.
    fn resolve(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            LocalResult::None => {
                // In a gap: the first local minute after it that exists, then back to its
                // first existing second (a gap that does not end on a minute).
                let mut t = local.with_second(0)?.with_nanosecond(0)?;
                for _ in 0..(2 * 24 * 60) {
                    t += Duration::minutes(1);
                    if let Some(valid) = self.tz.from_local_datetime(&t).earliest() {
                        let mut first = valid;
                        for back in 1..60 {
                            match self
                                .tz
                                .from_local_datetime(&(t - Duration::seconds(back)))
                                .earliest()
                            {
                                Some(earlier) if earlier < first => first = earlier,
                                _ => break,
                            }
                        }
                        return Some(first.with_timezone(&Utc));
                    }
                }
                None
            }
        }
    }

    /// The wall clock of `t` in the zone, as a `DateTime<Utc>` for croner (which then searches
    /// without daylight saving time), to the second.
    fn wall(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let local = t.with_timezone(&self.tz).naive_local();
        Utc.from_utc_datetime(&local.with_nanosecond(0).unwrap_or(local))
    }

    /// The first tick strictly after `after`; `None` when there is none (within croner's
    /// search limit).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut cursor = self.wall(after);
        for _ in 0..MAX_STEPS {
            let found = self.cron.find_next_occurrence(&cursor, false).ok()?;
            let t = self.resolve(found.naive_utc())?;
            if t > after {
                return Some(t);
            }
            cursor = found;
        }
        None
    }

    /// The last tick strictly before `before`; `None` when there is none.
    pub fn last_before(&self, before: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // From the next whole second (the wall clock is kept to the second).
        let mut cursor = self.wall(before + Duration::seconds(1));
        for _ in 0..MAX_STEPS {
            let found = self.cron.find_previous_occurrence(&cursor, false).ok()?;
            let t = self.resolve(found.naive_utc())?;
            if t < before {
                return Some(t);
            }
            cursor = found;
        }
        None
    }

    /// The first `n` ticks after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// How many ticks lie in `[from, to)`, counted up to [`MAX_COUNTED_SKIPS`] (`true`: more).
    fn count(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> (u64, bool) {
        let mut n = 0;
        let mut t = self.next_after(from - Duration::nanoseconds(1));
        while let Some(tick) = t {
            if tick >= to {
                return (n, false);
            }
            if n == MAX_COUNTED_SKIPS {
                return (n, true);
            }
            n += 1;
            t = self.next_after(tick);
        }
        (n, false)
    }
}

/// What to do with a due schedule ([`plan_ticks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickPlan {
    /// The ticks that fire now, oldest first: one task each.
    pub fire: Vec<DateTime<Utc>>,
    /// Missed ticks that do not fire (by the policy, or beyond the catch-up cap).
    pub skipped: u64,
    /// `skipped` is a lower bound: more were missed than were counted.
    pub skipped_more: bool,
    /// The schedule's next tick: the first after `now` (`None`: the expression has no more).
    pub next_tick: Option<DateTime<Utc>>,
}

/// The ticks of a schedule whose stored next tick is `next_tick`, at `now`: every tick in
/// `[next_tick, now]` is due. A due tick at most `late_after` old fires whatever the policy;
/// older ones were missed (no replica ran the schedule then) and `catch_up` decides: `skip`
/// fires none, `latest` the newest one, `all` every one, at most [`MAX_CATCH_UP_TICKS`] (the
/// newest; the older ones are skipped). The next tick is the first after `now`.
pub fn plan_ticks(
    spec: &Spec,
    next_tick: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: CatchUp,
    late_after: Duration,
) -> TickPlan {
    let mut plan = TickPlan {
        fire: Vec::new(),
        skipped: 0,
        skipped_more: false,
        next_tick: spec.next_after(now),
    };
    if next_tick > now {
        // Not due (another replica advanced it): the stored tick stays.
        plan.next_tick = Some(next_tick);
        return plan;
    }
    let cutoff = now - late_after;
    // Missed ticks: [next_tick, cutoff), newest first, as many as the policy fires.
    let wanted = match catch_up {
        CatchUp::Skip => 0,
        CatchUp::Latest => 1,
        CatchUp::All => MAX_CATCH_UP_TICKS,
    };
    let mut missed = Vec::new();
    if next_tick < cutoff {
        let mut before = cutoff;
        while missed.len() < wanted {
            match spec.last_before(before) {
                Some(t) if t >= next_tick => {
                    missed.push(t);
                    before = t;
                }
                _ => break,
            }
        }
        // Older missed ticks than the oldest that fires are skipped.
        let skip_to = missed.last().copied().unwrap_or(cutoff);
        let (n, more) = spec.count(next_tick, skip_to);
        plan.skipped = n;
        plan.skipped_more = more;
    }
    missed.reverse();
    plan.fire = missed;
    // On time: [max(next_tick, cutoff), now].
    let mut t = spec.next_after(next_tick.max(cutoff) - Duration::nanoseconds(1));
    while let Some(tick) = t {
        if tick > now {
            break;
        }
        plan.fire.push(tick);
        t = spec.next_after(tick);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn spec(cron: &str, tz: &str) -> Spec {
        Spec::parse(cron, tz, utc("2026-01-01T00:00:00Z")).unwrap()
    }

    const LATE: Duration = Duration::seconds(10);

    #[test]
    fn daily_in_a_zone_is_its_local_time() {
        let s = spec("0 2 * * *", "Europe/Paris");
        // Winter: CET = UTC+1.
        assert_eq!(
            s.next_after(utc("2026-01-10T12:00:00Z")),
            Some(utc("2026-01-11T01:00:00Z"))
        );
        // Summer: CEST = UTC+2.
        assert_eq!(
            s.next_after(utc("2026-07-10T12:00:00Z")),
            Some(utc("2026-07-11T00:00:00Z"))
        );
        // Strictly after: a tick is not its own successor.
        assert_eq!(
            s.next_after(utc("2026-07-11T00:00:00Z")),
            Some(utc("2026-07-12T00:00:00Z"))
        );
    }

    #[test]
    fn spring_forward_0230_fires_at_the_next_valid_instant() {
        // Europe/Paris, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does
        // not exist that day.
        let s = spec("30 2 * * *", "Europe/Paris");
        let runs = s.upcoming(utc("2026-03-27T12:00:00Z"), 3);
        assert_eq!(
            runs,
            vec![
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST: the end of the gap
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
            ]
        );
    }

    #[test]
    fn a_gap_is_one_tick_for_an_expression_matching_many_of_its_minutes() {
        // Every 20 minutes: 02:00, 02:20, 02:40 fall in the gap and become one tick at 03:00
        // CEST, which is also 03:00's own tick: it fires once.
        let s = spec("*/20 * * * *", "Europe/Paris");
        let runs = s.upcoming(utc("2026-03-29T00:30:00Z"), 4);
        assert_eq!(
            runs,
            vec![
                utc("2026-03-29T00:40:00Z"), // 01:40 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST
                utc("2026-03-29T01:20:00Z"),
                utc("2026-03-29T01:40:00Z"),
            ]
        );
    }

    #[test]
    fn fall_back_0230_fires_once() {
        // Europe/Paris, 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice
        // (00:30 UTC and 01:30 UTC). It fires once, at the first.
        let s = spec("30 2 * * *", "Europe/Paris");
        let runs = s.upcoming(utc("2026-10-24T12:00:00Z"), 3);
        assert_eq!(
            runs,
            vec![
                utc("2026-10-25T00:30:00Z"), // 02:30 CEST
                utc("2026-10-26T01:30:00Z"), // 02:30 CET, the next day
                utc("2026-10-27T01:30:00Z"),
            ]
        );
        // Asked during the repeated hour, after the first 02:30: the next day's.
        assert_eq!(
            s.next_after(utc("2026-10-25T01:15:00Z")),
            Some(utc("2026-10-26T01:30:00Z"))
        );
    }

    #[test]
    fn hourly_through_fall_back_fires_the_repeated_hour_once() {
        let s = spec("0 * * * *", "Europe/Paris");
        let runs = s.upcoming(utc("2026-10-24T23:30:00Z"), 4);
        assert_eq!(
            runs,
            vec![
                utc("2026-10-25T00:00:00Z"), // 02:00 CEST (the first 02:00)
                utc("2026-10-25T02:00:00Z"), // 03:00 CET (the second 02:00 does not fire)
                utc("2026-10-25T03:00:00Z"),
                utc("2026-10-25T04:00:00Z"),
            ]
        );
        assert!(runs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn last_before_mirrors_next_after() {
        let s = spec("30 2 * * *", "Europe/Paris");
        assert_eq!(
            s.last_before(utc("2026-03-29T12:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            s.last_before(utc("2026-03-29T01:00:00Z")),
            Some(utc("2026-03-28T01:30:00Z"))
        );
        assert_eq!(
            s.last_before(utc("2026-10-26T00:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z"))
        );
    }

    #[test]
    fn seconds_are_an_optional_sixth_field() {
        let s = spec("* * * * * *", "UTC");
        assert_eq!(
            s.upcoming(utc("2026-01-01T00:00:00.5Z"), 2),
            vec![utc("2026-01-01T00:00:01Z"), utc("2026-01-01T00:00:02Z")]
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_a_reason() {
        let now = utc("2026-01-01T00:00:00Z");
        let err = Spec::parse("61 * * * *", "UTC", now).unwrap_err();
        assert!(err.contains("invalid cron expression"), "{err}");
        let err = Spec::parse("0 2 * * *", "Mars/Olympus", now).unwrap_err();
        assert!(err.contains("unknown time zone"), "{err}");
        let err = Spec::parse("0 0 30 2 *", "UTC", now).unwrap_err();
        assert!(err.contains("no future time"), "{err}");
        let err = Spec::parse(&"*".repeat(MAX_CRON_LEN + 1), "UTC", now).unwrap_err();
        assert!(err.contains("at most"), "{err}");
        assert!(Spec::parse("0 2 * * * * *", "UTC", now).is_err());
    }

    #[test]
    fn a_tick_not_due_yet_changes_nothing() {
        let s = spec("0 * * * *", "UTC");
        let next = utc("2026-01-01T10:00:00Z");
        let plan = plan_ticks(&s, next, utc("2026-01-01T09:59:59Z"), CatchUp::All, LATE);
        assert!(plan.fire.is_empty());
        assert_eq!(plan.next_tick, Some(next));
    }

    #[test]
    fn an_on_time_tick_fires_whatever_the_policy() {
        let s = spec("0 * * * *", "UTC");
        let next = utc("2026-01-01T10:00:00Z");
        for policy in [CatchUp::Skip, CatchUp::Latest, CatchUp::All] {
            let plan = plan_ticks(&s, next, utc("2026-01-01T10:00:00.2Z"), policy, LATE);
            assert_eq!(plan.fire, vec![next], "{policy}");
            assert_eq!(plan.skipped, 0);
            assert_eq!(plan.next_tick, Some(utc("2026-01-01T11:00:00Z")));
        }
    }

    #[test]
    fn every_second_a_few_seconds_late_fires_each_second() {
        let s = spec("* * * * * *", "UTC");
        let plan = plan_ticks(
            &s,
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:00:03.5Z"),
            CatchUp::Skip,
            LATE,
        );
        assert_eq!(plan.fire.len(), 4);
        assert_eq!(plan.next_tick, Some(utc("2026-01-01T10:00:04Z")));
    }

    #[test]
    fn catch_up_after_five_missed_hours() {
        // Down from 05:00 to 10:20: 05:00 .. 10:00 (six ticks) are more than 10 s late.
        let s = spec("0 * * * *", "UTC");
        let next = utc("2026-01-01T05:00:00Z");
        let now = utc("2026-01-01T10:20:00Z");
        let skip = plan_ticks(&s, next, now, CatchUp::Skip, LATE);
        assert!(skip.fire.is_empty());
        assert_eq!((skip.skipped, skip.skipped_more), (6, false));
        assert_eq!(skip.next_tick, Some(utc("2026-01-01T11:00:00Z")));
        let latest = plan_ticks(&s, next, now, CatchUp::Latest, LATE);
        assert_eq!(latest.fire, vec![utc("2026-01-01T10:00:00Z")]);
        assert_eq!(latest.skipped, 5);
        assert_eq!(latest.next_tick, Some(utc("2026-01-01T11:00:00Z")));
        let all = plan_ticks(&s, next, now, CatchUp::All, LATE);
        assert_eq!(
            all.fire,
            (5..=10)
                .map(|h| utc(&format!("2026-01-01T{h:02}:00:00Z")))
                .collect::<Vec<_>>()
        );
        assert_eq!(all.skipped, 0);
    }

    #[test]
    fn catch_up_all_is_capped_to_the_newest_ticks() {
        // 200 missed minutes: the newest 100 fire, the 100 older ones are skipped.
        let s = spec("* * * * *", "UTC");
        let next = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-01-01T03:20:30Z");
        let plan = plan_ticks(&s, next, now, CatchUp::All, LATE);
        assert_eq!(plan.fire.len(), MAX_CATCH_UP_TICKS);
        assert_eq!(plan.fire[0], utc("2026-01-01T01:41:00Z"));
        assert_eq!(plan.fire[99], utc("2026-01-01T03:20:00Z"));
        assert_eq!(plan.skipped, 101);
        assert!(plan.fire.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn catch_up_across_spring_forward() {
        // Down over the night of 2026-03-29 in Paris; 02:30 fires at 03:00 CEST.
        let s = spec("30 2 * * *", "Europe/Paris");
        let plan = plan_ticks(
            &s,
            utc("2026-03-28T01:30:00Z"),
            utc("2026-03-29T08:00:00Z"),
            CatchUp::All,
            LATE,
        );
        assert_eq!(
            plan.fire,
            vec![utc("2026-03-28T01:30:00Z"), utc("2026-03-29T01:00:00Z")]
        );
        assert_eq!(plan.next_tick, Some(utc("2026-03-30T00:30:00Z")));
    }
}
