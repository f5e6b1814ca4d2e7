//! Broker identity: which RabbitMQ user may speak for a namespace. With
//! `TASKER_BROKER_IDENTITY=true`, a result, `started`, `heartbeat` or `worker_heartbeat` is
//! applied, and a task request accepted, only if its AMQP `user_id` property — which the broker
//! checks against the connection's user — is the user of the namespace concerned; the user of a
//! namespace is `TASKER_BROKER_USER_FORMAT` with `{namespace}` replaced (default
//! `tasker-{namespace}`). Pure, so that the check is a string compare per message.

/// The placeholder of [`UserFormat`].
pub const NAMESPACE_PLACEHOLDER: &str = "{namespace}";

/// Default user naming rule.
pub const DEFAULT_USER_FORMAT: &str = "tasker-{namespace}";

/// A user naming rule: the text before and after `{namespace}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserFormat {
    before: String,
    after: String,
}

impl UserFormat {
    /// Parses a rule; it must hold `{namespace}` exactly once.
    pub fn parse(format: &str) -> Result<Self, String> {
        let Some((before, after)) = format.split_once(NAMESPACE_PLACEHOLDER) else {
            return Err(format!(
                "broker user format {format:?} does not contain {NAMESPACE_PLACEHOLDER}"
            ));
        };
        if after.contains(NAMESPACE_PLACEHOLDER) {
            return Err(format!(
                "broker user format {format:?} contains {NAMESPACE_PLACEHOLDER} more than once"
            ));
        }
        Ok(Self {
            before: before.to_owned(),
            after: after.to_owned(),
        })
    }

    /// The user of `namespace`.
    pub fn user_of(&self, namespace: &str) -> String {
        format!("{}{namespace}{}", self.before, self.after)
    }

    /// True when `user` is the user of `namespace` (no allocation).
    pub fn is_user_of(&self, user: &str, namespace: &str) -> bool {
        user.len() == self.before.len() + namespace.len() + self.after.len()
            && user.starts_with(&self.before)
            && user.ends_with(&self.after)
            && &user[self.before.len()..user.len() - self.after.len()] == namespace
    }

    /// `None` when a message whose `user_id` is `user` may speak for `namespace`; otherwise the
    /// reason it may not (the dead letter's reason).
    pub fn refusal(&self, user: Option<&str>, namespace: &str) -> Option<String> {
        match user {
            Some(u) if self.is_user_of(u, namespace) => None,
            Some(u) => Some(format!(
                "broker identity: user_id {u:?} is not the user of namespace {namespace:?} \
                 (expected {:?})",
                self.user_of(namespace)
            )),
            None => Some(format!(
                "broker identity: the message has no user_id property (expected {:?}, the user \
                 of namespace {namespace:?})",
                self.user_of(namespace)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rule_names_one_user_per_namespace() {
        let f = UserFormat::parse(DEFAULT_USER_FORMAT).unwrap();
        assert_eq!(f.user_of("shop"), "tasker-shop");
        assert!(f.is_user_of("tasker-shop", "shop"));
        assert!(!f.is_user_of("tasker-shop", "sho"));
        assert!(!f.is_user_of("tasker-shopx", "shop"));
        assert!(!f.is_user_of("tasker-billing", "shop"));
        assert!(!f.is_user_of("shop", "shop"));
        assert!(!f.is_user_of("", "shop"));
        assert_eq!(f.refusal(Some("tasker-shop"), "shop"), None);
        assert_eq!(
            f.refusal(Some("tasker-billing"), "shop").unwrap(),
            "broker identity: user_id \"tasker-billing\" is not the user of namespace \"shop\" \
             (expected \"tasker-shop\")"
        );
        assert!(f.refusal(None, "shop").unwrap().contains("no user_id"));
    }

    #[test]
    fn rules_with_text_on_both_sides_and_bad_rules() {
        let f = UserFormat::parse("ns-{namespace}@prod").unwrap();
        assert_eq!(f.user_of("a"), "ns-a@prod");
        assert!(f.is_user_of("ns-a@prod", "a"));
        assert!(!f.is_user_of("ns-a@pro", "a"));
        // A bare rule: the user is the namespace.
        let bare = UserFormat::parse("{namespace}").unwrap();
        assert!(bare.is_user_of("shop", "shop"));
        assert!(UserFormat::parse("tasker").is_err());
        assert!(UserFormat::parse("{namespace}-{namespace}").is_err());
    }
}

/// The `rabbitmqctl` commands (arguments after `rabbitmqctl`) that give `user` the rights of
/// a worker of `namespace` and nothing more, on virtual host `vhost` (RabbitMQ 3.10 semantics):
///
/// - configure: only server-named queues (`amq.gen-…`: the cancel and event listeners' own);
///   passive declares (a worker checking its queues exist) need no permission;
/// - write (publish to an exchange, bind a queue): the results, tasks and dead-letter
///   exchanges and its own server-named queues;
/// - read (consume a queue, bind from an exchange): its namespace's step queues
///   (`{prefix}.step.{namespace}.…`), its server-named queues, the cancel and events exchanges;
/// - topic permissions (they apply to topic exchanges only; the steps exchange is direct): on
///   the results exchange it may publish only `{namespace}.<shard>` and `workers.heartbeat`, on
///   the tasks exchange only `{namespace}`, and it may bind to the events exchange only with
///   keys starting `{namespace}.`.
///
/// `add_user` is not among them: its password must not be printed ([`add_user_line`]).
pub fn permission_commands(
    names: &tasker_schemas::Names,
    namespace: &str,
    user: &str,
    vhost: &str,
) -> Vec<Vec<String>> {
    use tasker_schemas::topology::{WORKER_HEARTBEAT_ROUTING_KEY, regex_escape};
    let x = |name: String| regex_escape(&name);
    let ns = regex_escape(namespace);
    let configure = "^amq\\.gen-.*".to_owned();
    let write = format!(
        "^({}|{}|{}|amq\\.gen-.*)$",
        x(names.results_exchange()),
        x(names.tasks_exchange()),
        x(names.dead_letter_exchange()),
    );
    let read = format!(
        "^({}.*|amq\\.gen-.*|{}|{})$",
        names.step_queue_pattern(namespace).trim_start_matches('^'),
        x(names.cancel_exchange()),
        x(names.events_exchange()),
    );
    let s = |v: &str| v.to_owned();
    vec![
        vec![
            s("set_permissions"),
            s("-p"),
            s(vhost),
            s(user),
            configure,
            write,
            read,
        ],
        vec![
            s("set_topic_permissions"),
            s("-p"),
            s(vhost),
            s(user),
            names.results_exchange(),
            format!(
                "^({ns}\\.[0-9]+|{})$",
                regex_escape(WORKER_HEARTBEAT_ROUTING_KEY)
            ),
            s("^$"),
        ],
        vec![
            s("set_topic_permissions"),
            s("-p"),
            s(vhost),
            s(user),
            names.tasks_exchange(),
            format!("^{ns}$"),
            s("^$"),
        ],
        vec![
            s("set_topic_permissions"),
            s("-p"),
            s(vhost),
            s(user),
            names.events_exchange(),
            s("^$"),
            format!("^{ns}\\."),
        ],
    ]
}

/// The printed `add_user` line: the password is read from the environment variable
/// `password_var` by the shell, never written out.
pub fn add_user_line(user: &str, password_var: &str) -> String {
    format!(
        "rabbitmqctl add_user {} \"${password_var}\"",
        shell_quote(user)
    )
}

/// Quotes a word for a POSIX shell (single quotes).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./@%+=:,".contains(&b))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[cfg(test)]
mod permission_tests {
    use super::*;
    use tasker_schemas::Names;

    #[test]
    fn a_namespace_user_reads_its_step_queues_and_publishes_only_its_keys() {
        let cmds = permission_commands(&Names::default(), "shop", "tasker-shop", "/");
        assert_eq!(
            cmds[0],
            [
                "set_permissions",
                "-p",
                "/",
                "tasker-shop",
                "^amq\\.gen-.*",
                "^(tasker\\.results|tasker\\.tasks|tasker\\.dlx|amq\\.gen-.*)$",
                "^(tasker\\.step\\.shop\\..*|amq\\.gen-.*|tasker\\.cancel|tasker\\.events)$",
            ]
        );
        assert_eq!(cmds[1][4], "tasker.results");
        assert_eq!(cmds[1][5], "^(shop\\.[0-9]+|workers\\.heartbeat)$");
        assert_eq!(cmds[2][4..], ["tasker.tasks", "^shop$", "^$"]);
        assert_eq!(cmds[3][4..], ["tasker.events", "^$", "^shop\\."]);
        let line = add_user_line("tasker-shop", "TASKER_BROKER_PASSWORD");
        assert_eq!(
            line,
            "rabbitmqctl add_user tasker-shop \"$TASKER_BROKER_PASSWORD\""
        );
        assert_eq!(shell_quote("^a b$"), "'^a b$'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
